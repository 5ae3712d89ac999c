//! Tells what a guest's TCP port speaks: TLS first, then HTTP. TLS goes first because many TLS servers
//! answer a cleartext HTTP request with an HTTP error, which would mislabel them as plain HTTP.
//!
//! The TLS probe sends a minimal ClientHello and looks only at the first byte of the answer: a TLS record
//! (handshake 0x16, or an alert 0x15 from a server that dislikes our offer) means TLS. No TLS library is
//! needed to recognise one, so none is linked for it.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Tls,
    Http,
    Unknown,
}

pub async fn probe(addr: SocketAddr, host: &str) -> Speaks {
    if first_byte(addr, &client_hello(host)).await.is_some_and(|b| b == 0x16 || b == 0x15) {
        return Speaks::Tls;
    }
    let head = format!("HEAD / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: banger-probe\r\n\r\n");
    match read_some(addr, head.as_bytes()).await {
        Some(reply) if reply.starts_with(b"HTTP/") => Speaks::Http,
        _ => Speaks::Unknown,
    }
}

async fn first_byte(addr: SocketAddr, hello: &[u8]) -> Option<u8> {
    read_some(addr, hello).await.and_then(|r| r.first().copied())
}

async fn read_some(addr: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(request).await.ok()?;
        let mut buf = vec![0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        (n > 0).then(|| buf[..n].to_vec())
    })
    .await
    .ok()
    .flatten()
}

/// A TLS 1.2/1.3 ClientHello with common cipher suites, SNI, groups and signature algorithms.
fn client_hello(host: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut exts = vec![];
    let name = host.as_bytes();
    let mut sni = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    ext(&mut exts, 0x0000, &sni);
    ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, secp256r1
    ext(&mut exts, 0x000b, &[1, 0]); // ec point formats: uncompressed
    ext(&mut exts, 0x000d, &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x01]); // signature algorithms
    ext(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]); // supported versions: 1.3, 1.2
    let suites: [u16; 8] = [0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0x009c];
    let mut hello = vec![0x03, 0x03]; // legacy version TLS 1.2
    hello.extend_from_slice(&rand::random::<[u8; 32]>());
    hello.push(0); // no session id
    hello.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend_from_slice(&s.to_be_bytes());
    }
    hello.extend_from_slice(&[1, 0]); // compression: null
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Servers on loopback that answer like an HTTP server and like a TLS server would.
    async fn server(reply: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tells_tls_from_http_from_neither() {
        // A TLS server answers any hello with a handshake or alert record.
        assert_eq!(probe(server(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).await, "x.vm").await, Speaks::Tls);
        assert_eq!(probe(server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await, "x.vm").await, Speaks::Http);
        assert_eq!(probe(server(b"SSH-2.0-OpenSSH_9.2\r\n").await, "x.vm").await, Speaks::Unknown);
    }

    #[test]
    fn the_client_hello_is_one_well_formed_record() {
        let h = client_hello("alpha.vm");
        assert_eq!(&h[..3], &[0x16, 0x03, 0x01]);
        assert_eq!(u16::from_be_bytes([h[3], h[4]]) as usize, h.len() - 5);
        assert_eq!(h[5], 0x01, "ClientHello");
        assert!(h.windows(8).any(|w| w == b"alpha.vm"), "carries SNI");
    }
}
