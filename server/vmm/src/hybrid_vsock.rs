//! The hybrid vsock handshake (Firecracker's, and vhost-device-vsock's for QEMU): a Unix socket on the host
//! side of the guest's vsock, `CONNECT <port>\n` answered by `OK <assigned port>\n`, then the guest's stream.
//! Used by the guest channel (`guest::GuestConn::connect_vsock`) and by tests against a real Firecracker.
use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long `connect` waits for `OK <port>`. If the guest has not (yet) brought up its vsock
/// driver, Firecracker neither answers nor closes the connection, so without a bound a caller polling
/// for the guest agent would hang forever. A guest that is up answers (or refuses) in milliseconds.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Firecracker's hybrid vsock: connect to the host-side Unix socket, write `CONNECT <port>\n`, read one line
/// `OK <assigned port>\n`; after that the stream carries bytes to/from the guest's vsock port.
///
/// A guest that is not listening makes Firecracker close the stream (`ConnectionRefused`); a guest whose
/// vsock driver is not up yet gets no answer at all, so the handshake gives up after
/// [`HANDSHAKE_TIMEOUT`] (`TimedOut`).
pub async fn connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    connect_within(uds, port, HANDSHAKE_TIMEOUT).await
}

async fn connect_within(uds: &Path, port: u32, wait: Duration) -> io::Result<UnixStream> {
    let mut stream = crate::host::connect_vm_socket(uds).await?;
    match tokio::time::timeout(wait, vsock_handshake(&mut stream, port)).await {
        Ok(Ok(_assigned)) => Ok(stream),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer to CONNECT {port} on {uds:?} within {wait:?} (is the guest's vsock up?)"),
        )),
    }
}

async fn vsock_handshake(stream: &mut UnixStream, port: u32) -> io::Result<u32> {
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Byte by byte: anything after the newline already belongs to the guest's stream, and a buffered
    // reader would swallow it.
    let mut line = Vec::with_capacity(32);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "vsock port {port} refused: Firecracker closed the connection (nothing listens there in the guest)"
                ),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "vsock handshake answer is not a short line"));
        }
    }
    parse_ok_line(&line)
}

fn parse_ok_line(line: &[u8]) -> io::Result<u32> {
    let text = String::from_utf8_lossy(line);
    text.trim_end_matches('\r').strip_prefix("OK ").and_then(|port| port.trim().parse().ok()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("unexpected vsock handshake answer {text:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn vsock_handshake_hands_over_the_stream_without_eating_guest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut got = [0u8; 11];
            conn.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"CONNECT 52\n");
            // The answer and the guest's first bytes in one write, as a fast guest can produce.
            conn.write_all(b"OK 1073741824\nhello").await.unwrap();
            let mut echo = [0u8; 4];
            conn.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, b"ping");
        });
        let mut stream = connect(&uds, 52).await.unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        stream.write_all(b"ping").await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn vsock_refusal_garbage_and_silence_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let server = tokio::spawn(async move {
            // 1: refused (closed after the request), 2: garbage, 3: silence.
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 16];
            let _ = conn.read(&mut buf).await.unwrap();
            drop(conn);
            let (mut conn, _) = listener.accept().await.unwrap();
            let _ = conn.read(&mut buf).await.unwrap();
            conn.write_all(b"NOPE\n").await.unwrap();
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(conn);
        });
        let refused = connect(&uds, 52).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "{refused}");
        let garbage = connect(&uds, 52).await.unwrap_err();
        assert_eq!(garbage.kind(), io::ErrorKind::InvalidData, "{garbage}");
        let silent = connect_within(&uds, 52, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut, "{silent}");
        server.abort();
    }

    #[test]
    fn ok_line_parsing() {
        assert_eq!(parse_ok_line(b"OK 1073741824").unwrap(), 1073741824);
        assert_eq!(parse_ok_line(b"OK 5\r").unwrap(), 5);
        assert!(parse_ok_line(b"OK").is_err());
        assert!(parse_ok_line(b"ok 5").is_err());
        assert!(parse_ok_line(b"OK five").is_err());
    }
}
