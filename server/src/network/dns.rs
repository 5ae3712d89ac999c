//! Authoritative DNS for the `vm.` zone: `<name>.vm` resolves to the IPv4 address of the VM `<name>`.
//!
//! Records live in memory ([`DnsRecords`]), written by the VM engine as VMs come and go, and are served
//! by hickory-server over UDP and TCP. The server answers only for `vm.`: every other name is REFUSED
//! rather than recursed, because it is meant to be one resolver among several (e.g. a routing domain
//! `~vm` in systemd-resolved). REFUSED makes a client move on to its next resolver, whereas a recursive
//! or made-up answer would shadow the host's real DNS.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::future::Future;
use std::iter;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Short, because addresses change whenever a VM is recreated.
const TTL: u32 = 5;
/// How long an idle TCP client may hold its connection open.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection before the sender waits.
const TCP_RESPONSE_BUFFER: usize = 32;
/// TCP connections served at once, from everyone: each holds two daemon descriptors (see `guard_tcp`).
const TCP_MAX_CONNECTIONS: usize = 64;
/// TCP connections served at once from one source address (a guest).
const TCP_MAX_PER_SOURCE: usize = 4;
/// Longest any TCP connection lives, busy or not.
const TCP_MAX_LIFETIME: Duration = Duration::from_secs(30);

/// Live `<name>.vm` -> IPv4 records, shared between the VM engine (writer) and the DNS server (reader).
#[derive(Clone, Default)]
pub struct DnsRecords {
    /// Keyed by lowercase VM name, without ".vm" or a trailing dot.
    inner: Arc<RwLock<HashMap<String, Ipv4Addr>>>,
}

impl DnsRecords {
    pub fn new() -> Self {
        Self::default()
    }

    /// Points `name` (`alpha`, `alpha.vm` or `alpha.vm.`, any case) at `ip`, replacing any previous address.
    pub fn set(&self, name: &str, ip: Ipv4Addr) {
        self.write().insert(key(name), ip);
    }

    pub fn remove(&self, name: &str) {
        self.write().remove(&key(name));
    }

    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.lookup_label(&key(name))
    }

    /// Looks up an already-normalised key (a single lowercase DNS label).
    fn lookup_label(&self, label: &str) -> Option<Ipv4Addr> {
        self.inner.read().get(label).copied()
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, HashMap<String, Ipv4Addr>> {
        self.inner.write()
    }
}

fn key(name: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match name.strip_suffix(".vm") {
        Some(base) => base.to_owned(),
        None => name,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot bind DNS on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot bind the DNS TCP relay's inner listener on {addr}: is the loopback interface up? (ip link set lo up)"
    )]
    Loopback {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the `vm.` zone on UDP and TCP at `addr` until `shutdown` is cancelled. Returns once both sockets are
/// bound (so bind errors are reported to the caller); the server runs in a spawned task whose handle is returned.
///
/// With port 0, TCP listens on whichever port UDP was given, so both transports share one address.
pub async fn serve(
    addr: SocketAddr,
    records: DnsRecords,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DnsError> {
    let bind_error = |addr| move |source| DnsError::Bind { addr, source };
    let udp = UdpSocket::bind(addr).await.map_err(bind_error(addr))?;
    let addr = udp.local_addr().map_err(bind_error(addr))?;
    let tcp = TcpListener::bind(addr).await.map_err(bind_error(addr))?;

    // hickory's own TCP listener accepts without limit (3000 guest connections pinned 3000 daemon fds), so
    // the public one is banger's (`guard_tcp`, with caps), relaying to hickory's on loopback.
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let inner = TcpListener::bind(loopback).await.map_err(|source| DnsError::Loopback { addr: loopback, source })?;
    let inner_addr = inner.local_addr().map_err(bind_error(addr))?;
    let mut server = Server::new(VmZone::new(records));
    server.register_socket(udp);
    server.register_listener(inner, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    tokio::spawn(guard_tcp(tcp, inner_addr, shutdown.clone()));
    debug!(%addr, "serving DNS for vm.");

    Ok(tokio::spawn(async move {
        // block_until_done only returns by itself if every socket task has died.
        let died = tokio::select! {
            result = server.block_until_done() => Some(result),
            () = shutdown.cancelled() => None,
        };
        let result = match died {
            None => server.shutdown_gracefully().await,
            Some(Err(error)) => Err(error),
            // Socket tasks only end cleanly when cancelled, and only this task can cancel them.
            Some(Ok(())) => Err("DNS sockets closed unexpectedly".into()),
        };
        match result {
            Ok(()) => debug!(%addr, "DNS server stopped"),
            Err(error) => warn!(%addr, %error, "DNS server stopped"),
        }
    }))
}

/// Accepts DNS-over-TCP clients within caps (`TCP_MAX_CONNECTIONS` in all, `TCP_MAX_PER_SOURCE` per
/// address, `TCP_MAX_LIFETIME` each; hickory closes idle ones after `TCP_IDLE_TIMEOUT`) and relays each to
/// hickory's listener at `inner`. A client over a cap is closed at once.
async fn guard_tcp(public: TcpListener, inner: SocketAddr, shutdown: CancellationToken) {
    let total = Arc::new(tokio::sync::Semaphore::new(TCP_MAX_CONNECTIONS));
    let per_source: Arc<parking_lot::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    let mut refused = crate::guest::RateLimited::new("DNS TCP connection over its cap", 5, Duration::from_secs(60));
    loop {
        let (client, peer) = tokio::select! {
            r = public.accept() => match r {
                Ok(c) => c,
                // Out of descriptors or similar: wait a moment rather than spin.
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(permit) = total.clone().try_acquire_owned() else {
            refused.warn(&format!("{peer}: {TCP_MAX_CONNECTIONS} connections open"));
            continue;
        };
        let source = peer.ip();
        {
            let mut counts = per_source.lock();
            let n = counts.entry(source).or_default();
            if *n >= TCP_MAX_PER_SOURCE {
                refused.warn(&format!("{peer}: {TCP_MAX_PER_SOURCE} connections open from {source}"));
                continue;
            }
            *n += 1;
        }
        let (per_source, shutdown) = (per_source.clone(), shutdown.clone());
        tokio::spawn(async move {
            let relay = async {
                let mut client = client;
                let mut upstream = tokio::net::TcpStream::connect(inner).await?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            };
            tokio::select! {
                _ = tokio::time::timeout(TCP_MAX_LIFETIME, relay) => {}
                () = shutdown.cancelled() => {}
            }
            let mut counts = per_source.lock();
            if let Some(n) = counts.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&source);
                }
            }
            drop(permit);
        });
    }
}

/// The `vm.` zone as a hickory request handler.
struct VmZone {
    records: DnsRecords,
    origin: LowerName,
    soa: Record,
}

/// What a lookup in the zone produced; `NoData` and `NxDomain` are sent with the SOA so resolvers cache them.
enum Outcome {
    A(Ipv4Addr),
    Soa,
    NoData,
    NxDomain,
    Refused,
}

impl VmZone {
    fn new(records: DnsRecords) -> Self {
        let origin = Name::from_ascii("vm.").expect("valid name");
        let soa = SOA::new(
            Name::from_ascii("ns.vm.").expect("valid name"),
            Name::from_ascii("hostmaster.vm.").expect("valid name"),
            1,
            60,
            60,
            60,
            TTL,
        );
        Self { records, origin: LowerName::new(&origin), soa: Record::from_rdata(origin, TTL, RData::SOA(soa)) }
    }

    fn lookup(&self, name: &LowerName, qtype: RecordType, qclass: DNSClass) -> Outcome {
        if qclass != DNSClass::IN || !self.origin.zone_of(name) {
            return Outcome::Refused;
        }
        // Count labels by hand: `num_labels` skips a leading `*`, which would make `*.vm.` the apex.
        match name.iter().len() - self.origin.iter().len() {
            0 if matches!(qtype, RecordType::SOA | RecordType::ANY) => Outcome::Soa,
            0 => Outcome::NoData,
            1 => {
                let label = name.iter().next().and_then(|label| std::str::from_utf8(label).ok());
                match label.and_then(|label| self.records.lookup_label(label)) {
                    Some(ip) if matches!(qtype, RecordType::A | RecordType::ANY) => Outcome::A(ip),
                    Some(_) => Outcome::NoData,
                    None => Outcome::NxDomain,
                }
            }
            // Nothing lives below a VM name.
            _ => Outcome::NxDomain,
        }
    }

    async fn respond<R: ResponseHandler>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        // Answer EDNS with EDNS so resolvers keep using it with us (no options, version 0).
        let edns = request.edns.as_ref().map(|requested| {
            let mut edns = Edns::new();
            edns.set_max_payload(requested.max_payload().max(512)).set_version(0);
            edns
        });

        let mut metadata = Metadata::response_from_request(&request.metadata);
        let mut answers = Vec::new();
        let mut authority = Vec::new();
        metadata.response_code = if request.metadata.op_code != OpCode::Query {
            ResponseCode::NotImp
        } else {
            match request.request_info() {
                // Exactly one question is required; anything else is malformed.
                Err(_) => ResponseCode::FormErr,
                Ok(info) => {
                    let query = info.query;
                    let outcome = self.lookup(query.name(), query.query_type(), query.query_class());
                    metadata.authoritative = !matches!(outcome, Outcome::Refused);
                    match outcome {
                        Outcome::A(ip) => {
                            // Keep the client's case in the owner name: resolvers using 0x20 randomisation check it.
                            let owner = query.original().name().clone();
                            answers.push(Record::from_rdata(owner, TTL, RData::A(A(ip))));
                            ResponseCode::NoError
                        }
                        Outcome::Soa => {
                            answers.push(self.soa.clone());
                            ResponseCode::NoError
                        }
                        Outcome::NoData => {
                            authority.push(self.soa.clone());
                            ResponseCode::NoError
                        }
                        Outcome::NxDomain => {
                            authority.push(self.soa.clone());
                            ResponseCode::NXDomain
                        }
                        Outcome::Refused => ResponseCode::Refused,
                    }
                }
            }
        };

        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answers.iter(),
            iter::empty(),
            authority.iter(),
            iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                warn!(%error, "cannot send DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                Header { metadata, counts: HeaderCounts::default() }.into()
            }
        }
    }
}

// `RequestHandler` is declared with `#[async_trait]`, which this crate does not depend on; this is the
// signature that macro generates, written out by hand.
impl RequestHandler for VmZone {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: 'async_trait + ResponseHandler,
        T: 'async_trait + Time,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.respond(request, response_handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hickory_proto::op::{Message, MessageType, Query};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A port free for both UDP and TCP on 127.0.0.1 (found by binding and dropping).
    fn free_port() -> u16 {
        loop {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = udp.local_addr().unwrap().port();
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }

    struct TestServer {
        addr: SocketAddr,
        records: DnsRecords,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        async fn start() -> Self {
            let records = DnsRecords::new();
            records.set("alpha", Ipv4Addr::new(172, 30, 0, 2));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let shutdown = CancellationToken::new();
            let task = serve(addr, records.clone(), shutdown.clone()).await.unwrap();
            Self { addr, records, shutdown, task }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(TIMEOUT, self.task).await.expect("server did not stop").unwrap();
        }

        async fn udp(&self, name: &str, qtype: RecordType) -> Message {
            self.udp_message(query(name, qtype)).await
        }

        async fn udp_message(&self, request: Message) -> Message {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            socket.send_to(&request.to_vec().unwrap(), self.addr).await.unwrap();
            let mut buf = [0u8; 4096];
            let (len, _) = tokio::time::timeout(TIMEOUT, socket.recv_from(&mut buf)).await.expect("no reply").unwrap();
            decode(&request, &buf[..len])
        }

        async fn tcp(&self, name: &str, qtype: RecordType) -> Message {
            let request = query(name, qtype);
            let bytes = request.to_vec().unwrap();
            let mut stream = TcpStream::connect(self.addr).await.unwrap();
            stream.write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes()).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
            let reply = async {
                let len = stream.read_u16().await.unwrap();
                let mut buf = vec![0u8; usize::from(len)];
                stream.read_exact(&mut buf).await.unwrap();
                buf
            };
            let buf = tokio::time::timeout(TIMEOUT, reply).await.expect("no reply");
            decode(&request, &buf)
        }
    }

    #[tokio::test]
    async fn tcp_clients_beyond_the_per_source_cap_are_closed_and_the_rest_are_served() {
        let server = TestServer::start().await;
        // Idle clients from one address hold their connections, up to the cap.
        let mut held = vec![];
        for _ in 0..TCP_MAX_PER_SOURCE {
            held.push(TcpStream::connect(server.addr).await.unwrap());
        }
        // Wait until the relay counted them: a connection over the cap is closed at once.
        let mut extra = TcpStream::connect(server.addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(TIMEOUT, extra.read(&mut buf)).await.expect("the extra client stayed open");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // Once they go, the same source is served again.
        drop(held);
        let mut answered = false;
        for _ in 0..50 {
            let request = query("alpha.vm", RecordType::A).to_vec().unwrap();
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            s.write_all(&u16::try_from(request.len()).unwrap().to_be_bytes()).await.unwrap();
            s.write_all(&request).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(500), s.read_u16()).await.is_ok_and(|r| r.is_ok()) {
                answered = true;
                break;
            }
        }
        assert!(answered, "the source was not served after its connections closed");
        server.stop().await;
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut message = Message::new(0x4242, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        message
    }

    fn decode(request: &Message, bytes: &[u8]) -> Message {
        let response = Message::from_vec(bytes).unwrap();
        assert_eq!(response.metadata.id, request.metadata.id);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        response
    }

    fn a_records(response: &Message) -> Vec<(Ipv4Addr, u32)> {
        response
            .answers
            .iter()
            .map(|record| match &record.data {
                RData::A(A(ip)) => (*ip, record.ttl),
                other => panic!("unexpected answer {other:?}"),
            })
            .collect()
    }

    fn assert_soa_authority(response: &Message) {
        assert_eq!(response.authorities.len(), 1, "{response:?}");
        let record = &response.authorities[0];
        assert_eq!(record.name, Name::from_ascii("vm.").unwrap());
        let RData::SOA(soa) = &record.data else { panic!("not an SOA: {record:?}") };
        assert_eq!(soa.mname, Name::from_ascii("ns.vm.").unwrap());
        assert_eq!(soa.minimum, 5);
    }

    #[tokio::test]
    async fn known_name_gets_authoritative_a_with_ttl_5() {
        let server = TestServer::start().await;
        let response = server.udp("alpha.vm.", RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert_eq!(a_records(&response), [(Ipv4Addr::new(172, 30, 0, 2), 5)]);
        assert!(response.authorities.is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn names_are_case_insensitive() {
        let server = TestServer::start().await;
        let response = server.udp("ALPHA.VM.", RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&response), [(Ipv4Addr::new(172, 30, 0, 2), 5)]);
        // The owner name keeps the client's case.
        assert_eq!(response.answers[0].name.to_ascii(), "ALPHA.VM.");
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_names_are_nxdomain_with_soa() {
        let server = TestServer::start().await;
        for name in ["beta.vm.", "a.b.vm.", "x.alpha.vm.", "*.vm."] {
            let response = server.udp(name, RecordType::A).await;
            assert_eq!(response.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(response.metadata.authoritative, "{name}");
            assert!(response.answers.is_empty(), "{name}");
            assert_soa_authority(&response);
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn names_outside_the_zone_are_refused() {
        let server = TestServer::start().await;
        for name in ["example.com.", "vm.example.com.", "."] {
            let response = server.udp(name, RecordType::A).await;
            assert_eq!(response.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(!response.metadata.authoritative, "{name}");
            assert!(response.answers.is_empty() && response.authorities.is_empty(), "{name}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn other_types_of_a_known_name_are_nodata_with_soa() {
        let server = TestServer::start().await;
        for qtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let response = server.udp("alpha.vm.", qtype).await;
            assert_eq!(response.metadata.response_code, ResponseCode::NoError, "{qtype}");
            assert!(response.metadata.authoritative, "{qtype}");
            assert!(response.answers.is_empty(), "{qtype}");
            assert_soa_authority(&response);
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn zone_apex_serves_its_soa() {
        let server = TestServer::start().await;
        let response = server.udp("vm.", RecordType::SOA).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        let [record] = response.answers.as_slice() else { panic!("{response:?}") };
        let RData::SOA(soa) = &record.data else { panic!("not an SOA: {record:?}") };
        assert_eq!(soa.rname, Name::from_ascii("hostmaster.vm.").unwrap());
        assert_eq!((soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum), (1, 60, 60, 60, 5));
        server.stop().await;
    }

    #[tokio::test]
    async fn records_changed_while_serving_are_seen() {
        let server = TestServer::start().await;
        server.records.set("Gamma.vm.", Ipv4Addr::new(172, 30, 0, 3));
        let response = server.udp("gamma.vm.", RecordType::A).await;
        assert_eq!(a_records(&response), [(Ipv4Addr::new(172, 30, 0, 3), 5)]);

        server.records.remove("alpha");
        let response = server.udp("alpha.vm.", RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
        assert_soa_authority(&response);
        server.stop().await;
    }

    #[tokio::test]
    async fn answers_over_tcp() {
        let server = TestServer::start().await;
        let response = server.tcp("alpha.vm.", RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&response), [(Ipv4Addr::new(172, 30, 0, 2), 5)]);
        server.stop().await;
    }

    #[tokio::test]
    async fn non_query_opcodes_are_not_implemented() {
        let server = TestServer::start().await;
        let mut request = query("alpha.vm.", RecordType::A);
        request.metadata.op_code = OpCode::Status;
        let response = server.udp_message(request).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NotImp);
        assert!(response.answers.is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn edns_queries_get_edns_answers() {
        let server = TestServer::start().await;
        let mut request = query("alpha.vm.", RecordType::A);
        request.set_edns(Edns::new());
        let response = server.udp_message(request).await;
        assert!(response.edns.is_some());
        assert_eq!(a_records(&response), [(Ipv4Addr::new(172, 30, 0, 2), 5)]);
        server.stop().await;
    }

    #[tokio::test]
    async fn bind_errors_are_reported() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = serve(addr, DnsRecords::new(), CancellationToken::new()).await.unwrap_err();
        assert!(matches!(error, DnsError::Bind { addr: reported, .. } if reported == addr));
    }

    #[test]
    fn record_keys_ignore_case_zone_suffix_and_trailing_dot() {
        let records = DnsRecords::new();
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        records.set("Alpha.VM.", ip);
        for name in ["alpha", "ALPHA", "alpha.vm", "alpha.vm.", "alpha."] {
            assert_eq!(records.get(name), Some(ip), "{name}");
        }
        records.remove("ALPHA");
        assert_eq!(records.get("alpha"), None);
    }
}
