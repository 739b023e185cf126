//! The QUIC endpoint of a node: server and client at once, mutual TLS against the cluster CA.
//!
//! One long-lived connection per peer (dialled on first use, cached, redialled once it has
//! failed); one bidirectional stream per RPC, read to its end with a size limit on both sides.
//! Architecture Invariant: nothing here decodes a message body; bodies go to the `RpcHandler`.
//! Peers are authenticated (a certificate signed by the cluster CA, with ClientAuth), and the
//! dialler checks that the server's certificate names the node it meant to reach (target
//! `ANY_NODE`: any `node<N>` certificate of the cluster CA, for a seed address whose node id is
//! unknown). Authorising an authenticated peer (for example against the Raft membership) is the
//! job of an optional `PeerAuthorizer`, asked for every request from its header alone, before the
//! body is read; without one every CA-signed peer is served. Bodies being read or handled hold
//! bytes of a node-wide budget (`IN_FLIGHT_BYTES_MAX`), reserved by their declared length.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ReadError, ReadExactError, ReadToEndError, RecvStream, SendStream, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use super::certs::{cert_names, node_id_from_name, node_name, NodeIdentity};
use super::frame::{self, FRAME_BYTES_MAX, REASON_BYTES_MAX, REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES};
use super::{PeerAuthorizer, RpcHandler};
use crate::raft::admin::ANY_NODE;
use crate::raft::network::{BoxFuture, PeerTransport, RpcKind, TransportError};
use crate::state::NodeId;

/// ALPN protocol id: a TLS client that does not speak pickbox is refused in the handshake.
pub const ALPN: &[u8] = b"pickbox/1";
/// How long dialling a peer may take before the call fails as unreachable.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Upper bound on one call (send, remote handling, reply), and on how long the server waits for a
/// request's bytes. openraft cancels its own calls much sooner (heartbeat interval).
pub const CALL_TIMEOUT_MS: u64 = 10_000;
/// Keep-alive pings on idle connections, well below the idle timeout.
pub const KEEP_ALIVE_MS: u64 = 1_000;
/// A connection with no traffic (not even keep-alives) for this long is dead.
pub const IDLE_TIMEOUT_MS: u32 = 5_000;
/// After this many calls in a row on one cached connection were given up by their callers before
/// any answer came, the next call dials anew (the old connection is left to finish what is in
/// flight), unless the peer acknowledged a packet of the connection since the last of them began
/// (it is alive, only slow or on a lossy link). openraft gives up a heartbeat after 100 ms: a
/// peer that crashed and restarted at once (its new process cannot acknowledge anything on the
/// old connection) is reached again within a few heartbeats instead of after `IDLE_TIMEOUT_MS`,
/// during which it heard from no leader and called elections (seen: a killed follower restarted,
/// waited 5 s for the leader, and its higher term then unseated the leader). A live peer is not
/// redialled: on a lossy link a redial costs a TLS handshake under that loss, which often misses
/// the dial timeout (a 3-node sequential write with 15% of the datagrams lost: 7-12 MB/s and
/// 6.4 s of leader CPU per 512 MiB with redials, 13 MB/s and 4.5 s without).
pub const UNANSWERED_CALLS_MAX: u32 = 3;
/// Concurrent RPC streams a peer may open on one connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 128;
/// Concurrent incoming connections; beyond this new ones are refused.
pub const CONNECTIONS_MAX: usize = 256;
/// How long shutdown waits for connections to close cleanly.
pub const SHUTDOWN_WAIT_MS: u64 = 1_000;
/// Request body bytes being read or handled at once, across all connections: a request reserves
/// its declared length before its body is read (waiting, within `CALL_TIMEOUT_MS`, if the budget
/// is spent), so many concurrent 64 MiB messages cannot exhaust memory.
pub const IN_FLIGHT_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Largest body of a membership or status request (`Join`, `Remove`, `Status`), which any CA-signed
/// certificate, operators' included, may send: such peers cannot reserve much of the budget.
pub const ADMIN_REQUEST_BYTES_MAX: usize = 64 * 1024;
/// A peer may receive this many ack-eliciting packets before it must acknowledge at once (QUIC
/// ACK frequency extension; quinn's default is 1, an ACK for every other packet). Between nodes
/// nearly every packet is a request or a reply, which carries the ACK of what came the other way,
/// so a standalone ACK datagram per round (a send, a wake-up and a receive on both nodes) is waste.
pub const ACK_ELICITING_THRESHOLD_PACKETS: u32 = 8;
/// The longest a peer may hold back an ACK below the threshold (quinn's default is 25 ms). Short,
/// so that a lost packet is still detected promptly (the probe timeout includes this delay).
pub const ACK_DELAY_MAX_US: u64 = 5_000;
/// Largest UDP payload this endpoint accepts, and what MTU discovery searches up to on a loopback
/// endpoint (quinn's defaults are 1472 and 1452, Ethernet sizes): an AppendEntries with a 4 KiB
/// write then travels as one datagram instead of four, and a large one in few datagrams, since
/// most of QUIC's cost is per packet. Such an endpoint sends without segmentation offload (see
/// `GSO_UDP_PAYLOAD_BYTES_MAX`).
pub const UDP_PAYLOAD_BYTES_MAX: u16 = 65_000;
/// What MTU discovery searches up to on an endpoint that is not on loopback, which sends with
/// segmentation offload (GSO: quinn hands the kernel up to 10 datagrams in one system call).
/// Ten of them must fit the 65,535 bytes the kernel takes in one UDP send: a larger send fails
/// with EMSGSIZE, which quinn-udp treats as sent (it expects that only of MTU probes), so the
/// whole batch is lost. With 65,000-byte datagrams and GSO every batch of two or more was lost,
/// the congestion window collapsed, and bulk data went out as 1,200-byte loss probes: nearly all
/// of a 3-node sequential write (tcpdump: 22,912 sends of 10 x 1,200 bytes to each follower for
/// 256 MiB). On a 1,500-byte path discovery settles at that path's size either way.
pub const GSO_UDP_PAYLOAD_BYTES_MAX: u16 = 6_500;
/// How long an endpoint keeps the minimum datagram size (1,200 bytes) after quinn detected a
/// black hole (losses of large packets) before it searches again (quinn's default is a minute).
/// Congestion losses can trigger that detection too (quinn's docs say so), and a minute of
/// 1,200-byte datagrams is a minute of several times the CPU per byte. (Not seen since the GSO
/// fix: six 3-node runs of six 256 MiB writes each lost no packet.)
pub const BLACK_HOLE_COOLDOWN_SECS: u64 = 1;
/// Receive and send buffer asked for on the endpoint's UDP socket. The kernel's default (208 KiB)
/// overflowed under a 3-node sequential write (1,033 datagrams dropped of 76,130 sent for 256 MiB,
/// each loss halving the sender's congestion window).
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// The refusal of a request that arrives before the node serves it (its store still opening).
pub const NOT_READY: &str = "node not ready: no handler attached";
/// The refusal of a request from a peer the node does not accept (not a member, for one); the
/// Raft client backs off from it (`raft::network::REFUSAL_NOT_AUTHORIZED`).
pub const NOT_AUTHORIZED: &str = crate::raft::network::REFUSAL_NOT_AUTHORIZED;
/// The refusal of a request while the node has too many request bytes in flight (backed off
/// from too).
pub const BUSY: &str = crate::raft::network::REFUSAL_BUSY;
/// Upper bound on a `Join` or `Remove` call: the leader waits for a learner to catch up and for
/// membership changes to commit, which can take longer than an ordinary call.
pub const MEMBERSHIP_CALL_TIMEOUT_MS: u64 = 60_000;

/// How long a call of `kind` may take (client side) and may be handled (server side).
pub fn call_timeout(kind: Option<RpcKind>) -> Duration {
    match kind {
        Some(RpcKind::Join | RpcKind::Remove) => Duration::from_millis(MEMBERSHIP_CALL_TIMEOUT_MS),
        // The last chunk is answered after the whole snapshot is installed; the Raft network
        // adapter bounds every chunk itself (the last one in proportion to the snapshot's size).
        Some(RpcKind::InstallSnapshot) => Duration::from_millis(crate::raft::SNAPSHOT_CALL_TIMEOUT_CEILING_MS),
        _ => Duration::from_millis(CALL_TIMEOUT_MS),
    }
}

/// The largest body a request of `kind` may declare.
fn body_limit(kind: RpcKind) -> usize {
    match kind {
        RpcKind::Join | RpcKind::Remove | RpcKind::Status => ADMIN_REQUEST_BYTES_MAX,
        _ => crate::config::MESSAGE_BYTES_MAX,
    }
}

/// Stream error code: the message was over `FRAME_BYTES_MAX`.
pub const CODE_TOO_LONG: u32 = 1;
/// Stream error code: the request did not arrive in time.
pub const CODE_TIMEOUT: u32 = 2;
/// Stream error code: the caller gave up (its future was dropped).
pub const CODE_CANCELLED: u32 = 3;
/// Stream error code: the request was refused before its body was read (garbled, unauthorised,
/// or the node is busy); the reply says why.
pub const CODE_REFUSED: u32 = 4;

/// Why the endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The certificates or key were refused by rustls (wrong kind, key does not match, ...).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A QUIC endpoint setting was refused by quinn (a constant out of its bounds).
    #[error("QUIC configuration: {0}")]
    Quic(String),
    /// Binding the UDP socket failed.
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// How to start a node's endpoint.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    pub node_id: NodeId,
    /// Where to listen (use 127.0.0.1:0 in tests).
    pub listen: SocketAddr,
    pub identity: NodeIdentity,
}

/// Counters of what the endpoint did and refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub connections_accepted: u64,
    pub handshakes_refused: u64,
    pub requests_served: u64,
    pub messages_oversized: u64,
    pub messages_garbled: u64,
    pub handler_errors: u64,
    pub requests_unauthorized: u64,
    pub dials: u64,
    /// The most request body bytes reserved at once (never above `IN_FLIGHT_BYTES_MAX`).
    pub request_bytes_peak: u64,
    /// UDP datagrams sent, bytes in them, and packets found lost, over the connections this
    /// endpoint dialled that are open now (where its requests go).
    pub datagrams_sent: u64,
    pub datagram_bytes_sent: u64,
    pub packets_lost: u64,
}

#[derive(Default)]
struct Counters {
    connections_accepted: AtomicU64,
    handshakes_refused: AtomicU64,
    requests_served: AtomicU64,
    messages_oversized: AtomicU64,
    messages_garbled: AtomicU64,
    handler_errors: AtomicU64,
    requests_unauthorized: AtomicU64,
    dials: AtomicU64,
    request_bytes_peak: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts `bytes` into a gauge for as long as it lives.
struct Held<'a> {
    gauge: &'a AtomicU64,
    bytes: u64,
}

impl<'a> Held<'a> {
    fn new(gauge: &'a AtomicU64, bytes: u64) -> Self {
        gauge.fetch_add(bytes, Ordering::Relaxed);
        Held { gauge, bytes }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A cached connection to one peer and the address it was dialled at.
struct Cached {
    addr: SocketAddr,
    conn: Connection,
    /// Calls given up by their callers in a row without an answer (see `UNANSWERED_CALLS_MAX`).
    unanswered: Arc<AtomicU32>,
}

/// Counts a call its caller gave up (dropped) before it ended; see `UNANSWERED_CALLS_MAX`.
struct Unanswered<'a> {
    inner: &'a Inner,
    target: NodeId,
    conn: &'a Connection,
    count: &'a AtomicU32,
    /// ACK frames the connection had received when the call began.
    acks_before: u64,
    ended: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= UNANSWERED_CALLS_MAX {
            if acknowledged_since(self.conn, self.acks_before) {
                tracing::debug!(node = self.inner.node_id, target = self.target, n, "calls unanswered in a row, but the peer acknowledges: connection kept");
            } else {
                tracing::debug!(node = self.inner.node_id, target = self.target, n, "calls unanswered in a row: the next call dials anew");
                self.inner.forget(self.target, self.conn);
            }
        }
    }
}

/// ACK frames `conn` has received from its peer so far.
fn acks_received(conn: &Connection) -> u64 {
    conn.stats().frame_rx.acks
}

/// Whether the peer acknowledged anything on `conn` since it had sent `acks_before` ACK frames: a
/// sign of life that a restarted peer cannot give for its old connection (its packets no longer
/// decrypt).
fn acknowledged_since(conn: &Connection, acks_before: u64) -> bool {
    acks_received(conn) > acks_before
}

type PeerSlot = Arc<tokio::sync::Mutex<Option<Cached>>>;

struct Inner {
    node_id: NodeId,
    endpoint: quinn::Endpoint,
    handler: RwLock<Option<Arc<dyn RpcHandler>>>,
    authorizer: RwLock<Option<Arc<dyn PeerAuthorizer>>>,
    peers: Mutex<HashMap<NodeId, PeerSlot>>,
    counters: Counters,
    connections: Arc<tokio::sync::Semaphore>,
    /// Request bytes in flight (see `IN_FLIGHT_BYTES_MAX`); one permit per byte.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes of the reservations currently held (for `request_bytes_peak`).
    request_bytes: AtomicU64,
    /// Client configuration for `ANY_NODE` targets (no check of which node answers).
    any_node_client: quinn::ClientConfig,
}

/// A node's QUIC endpoint; implements `PeerTransport` for outgoing calls and serves incoming ones
/// with the attached `RpcHandler`.
pub struct QuicTransport {
    inner: Arc<Inner>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

static PROVIDER: Once = Once::new();

/// Install ring as the process-wide rustls provider (once; keeps an already installed one). The
/// configs below name the provider explicitly as well, so they do not depend on this.
pub fn install_crypto_provider() {
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn tls_err(e: impl std::fmt::Display) -> SetupError {
    SetupError::Tls(e.to_string())
}

/// Accepts a server certificate signed by the cluster CA whose name is `node<N>` for any N: for
/// dialling a seed address whose node id the caller does not know (`ANY_NODE`). The chain, validity
/// and ServerAuth checks are webpki's, with the server name taken from the certificate itself.
#[derive(Debug)]
struct AnyNodeVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = cert_names(end_entity.as_ref())
            .into_iter()
            .find(|n| node_id_from_name(n).is_some())
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        self.0.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The server configuration, the client configuration, and the client configuration for
/// `ANY_NODE` targets of a node; `loopback`: the node listens on a loopback address (so every
/// peer is on this host).
fn configs(
    identity: &NodeIdentity,
    loopback: bool,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig, quinn::ClientConfig), SetupError> {
    install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in &identity.ca {
        roots.add(ca.clone()).map_err(tls_err)?;
    }
    let roots = Arc::new(roots);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build().map_err(tls_err)?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(tls_err)?;
    let mut any_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyNodeVerifier(webpki)))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    any_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    client_tls.alpn_protocols = vec![ALPN.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)))
        .max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency
        .ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD_PACKETS))
        .max_ack_delay(Some(Duration::from_micros(ACK_DELAY_MAX_US)));
    transport.ack_frequency_config(Some(ack_frequency));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    // On loopback one datagram per system call is the cheaper choice. Six 256 MiB files written
    // in a row on a 3-node cluster, CPU of the leader / of each follower: 6.3-7.4 s / 4.9-5.6 s
    // that way, 7.4 s / 6.0-6.1 s with offload and 6,500-byte datagrams, 12.4-12.5 s /
    // 10.0-10.2 s with offload and 65,000 (the bug described at `GSO_UDP_PAYLOAD_BYTES_MAX`).
    if loopback {
        mtu.upper_bound(UDP_PAYLOAD_BYTES_MAX);
        transport.enable_segmentation_offload(false);
    } else {
        mtu.upper_bound(GSO_UDP_PAYLOAD_BYTES_MAX);
    }
    mtu.black_hole_cooldown(Duration::from_secs(BLACK_HOLE_COOLDOWN_SECS));
    transport.mtu_discovery_config(Some(mtu));
    let transport = Arc::new(transport);

    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).map_err(tls_err)?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).map_err(tls_err)?));
    client.transport_config(transport.clone());
    let mut any = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(any_tls).map_err(tls_err)?));
    any.transport_config(transport);
    Ok((server, client, any))
}

/// The names in the verified certificate of the other side of `conn`, for logs.
fn peer_name(conn: &Connection) -> String {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|leaf| cert_names(leaf.as_ref()).join(",")))
        .unwrap_or_else(|| "<no certificate>".into())
}

/// Ask for `SOCKET_BUFFER_BYTES` of receive and send buffer on the endpoint's socket: beyond
/// net.core.rmem_max / wmem_max where the node may (CAP_NET_ADMIN, as a root node has:
/// SO_RCVBUFFORCE), else capped by them; say so when the kernel grants less.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let bytes = SOCKET_BUFFER_BYTES;
    let sock = socket2::SockRef::from(socket);
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    }
    let (recv, send) = (sock.recv_buffer_size().unwrap_or(0), sock.send_buffer_size().unwrap_or(0));
    // Linux reports twice the size it granted (it counts its own bookkeeping).
    let wanted = 2 * SOCKET_BUFFER_BYTES;
    if recv < wanted || send < wanted {
        tracing::warn!(
            recv_bytes = recv / 2,
            send_bytes = send / 2,
            wanted_bytes = SOCKET_BUFFER_BYTES,
            "the kernel granted smaller UDP socket buffers than asked for: bursts of replication \
             traffic may be dropped and slowed by congestion control; raise net.core.rmem_max and \
             net.core.wmem_max"
        );
    }
}

impl QuicTransport {
    /// Bind the endpoint and start accepting. Must be called inside a tokio runtime. Incoming
    /// requests are refused until a handler is attached.
    pub fn bind(cfg: QuicConfig) -> Result<Arc<QuicTransport>, SetupError> {
        let (server, client, any_node_client) = configs(&cfg.identity, cfg.listen.ip().is_loopback())?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(UDP_PAYLOAD_BYTES_MAX)
            .map_err(|e| SetupError::Quic(e.to_string()))?;
        let socket = std::net::UdpSocket::bind(cfg.listen)
            .map_err(|source| SetupError::Bind { addr: cfg.listen, source })?;
        size_socket_buffers(&socket);
        let mut endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime))
                .map_err(|source| SetupError::Bind { addr: cfg.listen, source })?;
        endpoint.set_default_client_config(client);
        let inner = Arc::new(Inner {
            node_id: cfg.node_id,
            endpoint,
            handler: RwLock::new(None),
            authorizer: RwLock::new(None),
            peers: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES_MAX)),
            request_bytes: AtomicU64::new(0),
            any_node_client,
        });
        let accept = tokio::spawn(accept_loop(inner.clone()));
        tracing::info!(node = cfg.node_id, addr = %inner.local_addr(), "QUIC endpoint listening");
        Ok(Arc::new(QuicTransport { inner, accept: Mutex::new(Some(accept)) }))
    }

    /// The address the endpoint listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    /// Serve incoming requests with `handler` from now on (replaces any previous one).
    pub fn attach(&self, handler: Arc<dyn RpcHandler>) {
        *self.inner.handler.write().unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Check every incoming request's peer with `authorizer` from now on (for example against the
    /// Raft membership). Without one, any peer with a certificate from the cluster CA is served.
    pub fn set_authorizer(&self, authorizer: Arc<dyn PeerAuthorizer>) {
        *self.inner.authorizer.write().unwrap_or_else(|e| e.into_inner()) = Some(authorizer);
    }

    /// Refuse incoming requests again (for example while the replica shuts down).
    pub fn detach(&self) {
        *self.inner.handler.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What the endpoint did and refused so far.
    pub fn stats(&self) -> TransportStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            connections_accepted: g(&c.connections_accepted),
            handshakes_refused: g(&c.handshakes_refused),
            requests_served: g(&c.requests_served),
            messages_oversized: g(&c.messages_oversized),
            messages_garbled: g(&c.messages_garbled),
            handler_errors: g(&c.handler_errors),
            requests_unauthorized: g(&c.requests_unauthorized),
            dials: g(&c.dials),
            request_bytes_peak: g(&c.request_bytes_peak),
            ..self.inner.connection_stats()
        }
    }

    /// Send `frame` exactly as given (no header, no size check) and return the raw reply: for
    /// tests of the server's refusal paths (garbled or oversized messages).
    #[doc(hidden)]
    pub async fn call_raw(&self, target: NodeId, addr: &str, frame: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let kind = frame.get(2).copied().and_then(frame::kind_from_code);
        self.inner.exchange(target, addr, vec![Bytes::from(frame)], kind).await
    }

    /// Stop accepting, close every connection, and wait (bounded) for them to close.
    pub async fn shutdown(&self) {
        self.detach();
        self.inner.endpoint.close(VarInt::from_u32(0), b"shutdown");
        if let Some(h) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        self.inner.peers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _ = tokio::time::timeout(Duration::from_millis(SHUTDOWN_WAIT_MS), self.inner.endpoint.wait_idle()).await;
        tracing::info!(node = self.inner.node_id, "QUIC endpoint closed");
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.inner.endpoint.close(VarInt::from_u32(0), b"dropped");
        if let Some(h) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

impl PeerTransport for QuicTransport {
    fn call(
        &self,
        target: NodeId,
        addr: &str,
        kind: RpcKind,
        body: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, TransportError>> {
        let inner = self.inner.clone();
        let addr = addr.to_string();
        Box::pin(async move {
            let header =
                frame::encode_header(kind, body.len()).map_err(|e| TransportError::Network(target, e.to_string()))?;
            // Header and body go out as two chunks: quinn takes `Bytes` as they are, where a
            // slice would be copied (and a frame built in one buffer would copy the body first).
            let chunks = vec![Bytes::copy_from_slice(&header), Bytes::from(body)];
            inner.exchange(target, &addr, chunks, Some(kind)).await
        })
    }

    fn reachable(&self, target: NodeId, addr: &str) -> BoxFuture<Result<(), TransportError>> {
        let inner = self.inner.clone();
        let addr = addr.to_string();
        Box::pin(async move {
            let sock = resolve(&addr).await.map_err(|e| TransportError::Unreachable(target, e))?;
            inner.connection(target, sock).await.map(|_| ())
        })
    }
}

/// How one exchange failed: the connection (redial next time) or only this stream.
enum Failure {
    Connection(String),
    Stream(String),
}

/// Resets a send stream if the call is dropped before it finished writing, so the peer never
/// takes a truncated request for a whole one (quinn finishes a dropped stream).
struct ResetOnDrop(Option<SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.reset(VarInt::from_u32(CODE_CANCELLED));
        }
    }
}

fn code_reason(code: VarInt) -> String {
    match u32::try_from(code.into_inner()) {
        Ok(CODE_TOO_LONG) => "message over the peer's size limit".into(),
        Ok(CODE_TIMEOUT) => "peer timed out waiting for the request".into(),
        Ok(CODE_CANCELLED) => "cancelled".into(),
        Ok(CODE_REFUSED) => "refused".into(),
        _ => format!("stream error code {code}"),
    }
}

impl Inner {
    fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The datagram and loss counts of the dialled connections open now (a slot busy with a dial
    /// is skipped).
    fn connection_stats(&self) -> TransportStats {
        let slots: Vec<PeerSlot> = self.peers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut out = TransportStats::default();
        for slot in slots {
            if let Ok(guard) = slot.try_lock() {
                if let Some(cached) = guard.as_ref() {
                    let st = cached.conn.stats();
                    out.datagrams_sent += st.udp_tx.datagrams;
                    out.datagram_bytes_sent += st.udp_tx.bytes;
                    out.packets_lost += st.path.lost_packets;
                }
            }
        }
        out
    }

    /// One request/reply exchange with `target` at `addr` (the request frame in `chunks`), bounded
    /// by the call timeout of `kind`.
    async fn exchange(
        &self,
        target: NodeId,
        addr: &str,
        chunks: Vec<Bytes>,
        kind: Option<RpcKind>,
    ) -> Result<Vec<u8>, TransportError> {
        let sock = resolve(addr).await.map_err(|e| TransportError::Unreachable(target, e))?;
        let (conn, unanswered) = self.connection(target, sock).await?;
        let timeout = call_timeout(kind);
        let acks_before = acks_received(&conn);
        let mut pending = Unanswered { inner: self, target, conn: &conn, count: &unanswered, acks_before, ended: false };
        let call = tokio::time::timeout(timeout, exchange_on(&conn, chunks)).await;
        pending.ended = true;
        drop(pending);
        if matches!(call, Ok(Ok(_)) | Ok(Err(Failure::Stream(_)))) {
            unanswered.store(0, Ordering::Relaxed);
        }
        let reply = match call {
            Err(_) => {
                // A peer that still acknowledges is slow, not gone: keep the connection (see
                // `UNANSWERED_CALLS_MAX`).
                if !acknowledged_since(&conn, acks_before) {
                    self.forget(target, &conn);
                }
                return Err(TransportError::Unreachable(target, format!("no reply within {timeout:?}")));
            }
            Ok(Err(Failure::Connection(e))) => {
                self.forget(target, &conn);
                tracing::debug!(node = self.node_id, target, %sock, error = %e, "connection to peer failed");
                return Err(TransportError::Unreachable(target, e));
            }
            Ok(Err(Failure::Stream(e))) => return Err(TransportError::Network(target, e)),
            Ok(Ok(reply)) => reply,
        };
        match frame::decode_reply(reply) {
            Ok(Ok(payload)) => Ok(payload),
            // A peer still opening its store is unreachable for now: callers back off (openraft
            // retries a Network error at once: a leader made ~2,800 calls in the 1.2 s a
            // restarting follower took to open its store, each logged twice).
            Ok(Err(reason)) if reason == NOT_READY => Err(TransportError::Unreachable(target, format!("refused by peer: {reason}"))),
            Ok(Err(reason)) => Err(TransportError::Network(target, format!("refused by peer: {reason}"))),
            Err(e) => Err(TransportError::Network(target, format!("bad reply: {e}"))),
        }
    }

    /// The cached connection to `target`, or a new one if there is none, it failed, or the
    /// address changed. Concurrent calls to one peer share one dial.
    async fn connection(&self, target: NodeId, addr: SocketAddr) -> Result<(Connection, Arc<AtomicU32>), TransportError> {
        let slot = self.peers.lock().unwrap_or_else(|e| e.into_inner()).entry(target).or_default().clone();
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.addr == addr && c.conn.close_reason().is_none() {
                return Ok((c.conn.clone(), c.unanswered.clone()));
            }
        }
        *cached = None;
        bump(&self.counters.dials);
        let name = node_name(target);
        let connecting = if target == ANY_NODE {
            self.endpoint.connect_with(self.any_node_client.clone(), addr, &name)
        } else {
            self.endpoint.connect(addr, &name)
        }
        .map_err(|e| TransportError::Unreachable(target, format!("dial {addr}: {e}")))?;
        let conn = match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connecting).await {
            Err(_) => {
                return Err(TransportError::Unreachable(
                    target,
                    format!("dial {addr}: no answer within {CONNECT_TIMEOUT_MS} ms"),
                ))
            }
            Ok(Err(e)) => return Err(TransportError::Unreachable(target, format!("dial {addr}: {e}"))),
            Ok(Ok(c)) => c,
        };
        tracing::info!(node = self.node_id, target, %addr, peer = %peer_name(&conn), "connected to peer");
        let unanswered = Arc::new(AtomicU32::new(0));
        *cached = Some(Cached { addr, conn: conn.clone(), unanswered: unanswered.clone() });
        Ok((conn, unanswered))
    }

    /// Drop `conn` from the cache (if it is still the cached one) so the next call redials.
    fn forget(&self, target: NodeId, conn: &Connection) {
        let slot = self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(&target).cloned();
        if let Some(slot) = slot {
            if let Ok(mut g) = slot.try_lock() {
                if g.as_ref().is_some_and(|c| c.conn.stable_id() == conn.stable_id()) {
                    *g = None;
                }
            }
        }
    }

    /// Serve one incoming connection: handshake, then one task per stream.
    async fn serve_connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            tracing::warn!(node = self.node_id, %remote, max = CONNECTIONS_MAX, "refused a connection: too many connections");
            incoming.refuse();
            return;
        };
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                bump(&self.counters.handshakes_refused);
                tracing::warn!(node = self.node_id, %remote, error = %e, "refused a peer: TLS handshake failed");
                return;
            }
        };
        bump(&self.counters.connections_accepted);
        let peer = peer_name(&conn);
        let peer_id = peer.split(',').find_map(node_id_from_name);
        tracing::info!(node = self.node_id, %remote, %peer, "peer connected");
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let this = self.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move { this.serve_stream(send, recv, &peer, peer_id, remote).await });
                }
                Err(e) => {
                    tracing::debug!(node = self.node_id, %remote, %peer, reason = %e, "peer connection closed");
                    return;
                }
            }
        }
    }

    /// Serve one RPC stream: read the header, check it and authorise the peer for its kind
    /// before reading the body, reserve the body's bytes from the in-flight budget, read it
    /// (bounded in size and time), call the handler, write the reply. Every refusal is answered
    /// and logged; nothing here panics on input.
    async fn serve_stream(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
        peer: &str,
        peer_id: Option<NodeId>,
        remote: SocketAddr,
    ) {
        let node = self.node_id;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(CALL_TIMEOUT_MS);
        let timed_out = |recv: &mut RecvStream, send: &mut SendStream| {
            tracing::warn!(node, %remote, %peer, timeout_ms = CALL_TIMEOUT_MS, "request not received in time; closing the stream");
            let _ = recv.stop(VarInt::from_u32(CODE_TIMEOUT));
            let _ = send.reset(VarInt::from_u32(CODE_TIMEOUT));
        };

        let mut header = [0u8; REQUEST_HEADER_BYTES];
        match tokio::time::timeout_at(deadline, recv.read_exact(&mut header)).await {
            Err(_) => return timed_out(&mut recv, &mut send),
            Ok(Err(ReadExactError::FinishedEarly(n))) => {
                return self.refuse_garbled(&mut send, &mut recv, peer, remote, frame::FrameError::Short(n)).await;
            }
            Ok(Err(ReadExactError::ReadError(e))) => {
                tracing::debug!(node, %remote, %peer, error = %e, "request stream aborted by the peer");
                return;
            }
            Ok(Ok(())) => {}
        }
        let (kind, len) = match frame::decode_header(&header) {
            Ok(h) => h,
            Err(frame::FrameError::TooLong(n)) => {
                return self.refuse_oversized(&mut send, &mut recv, peer, remote, n).await
            }
            Err(e) => return self.refuse_garbled(&mut send, &mut recv, peer, remote, e).await,
        };

        let authorizer = self.authorizer.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(auth) = authorizer {
            if !auth.authorize(peer_id, kind) {
                bump(&self.counters.requests_unauthorized);
                tracing::warn!(node, %remote, %peer, ?peer_id, ?kind, "refused a request: peer not authorized");
                let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                reply(&mut send, frame::encode_refused(NOT_AUTHORIZED)).await;
                return;
            }
        }
        if len > body_limit(kind) {
            return self.refuse_oversized(&mut send, &mut recv, peer, remote, len).await;
        }

        // Reserve the body's bytes before reading them; held until the reply is written.
        let permits = u32::try_from(len).unwrap_or(u32::MAX);
        let reserved = tokio::time::timeout_at(deadline, self.in_flight.clone().acquire_many_owned(permits)).await;
        let _reserved = match reserved {
            Err(_) => {
                tracing::warn!(node, %remote, %peer, ?kind, bytes = len, budget = IN_FLIGHT_BYTES_MAX, "request bytes in flight over the budget for too long; refused");
                let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                reply(&mut send, frame::encode_refused(BUSY)).await;
                return;
            }
            Ok(Err(_)) => return, // the semaphore is never closed
            Ok(Ok(p)) => p,
        };
        // (tokio hands permits to a waiting request as they free up, so the semaphore's own count
        // would include bytes not yet reserved; count whole reservations instead.)
        let _held = Held::new(&self.request_bytes, len as u64);
        let now = self.request_bytes.load(Ordering::Relaxed);
        self.counters.request_bytes_peak.fetch_max(now, Ordering::Relaxed);
        let body = read_body(&mut recv, len);
        let body = match tokio::time::timeout_at(deadline, body).await {
            Err(_) => return timed_out(&mut recv, &mut send),
            Ok(Err(ReadExactError::FinishedEarly(n))) => {
                let e = frame::FrameError::Length { declared: len, got: n };
                return self.refuse_garbled(&mut send, &mut recv, peer, remote, e).await;
            }
            Ok(Err(ReadExactError::ReadError(e))) => {
                tracing::debug!(node, %remote, %peer, error = %e, "request stream aborted by the peer");
                return;
            }
            Ok(Ok(body)) => body,
        };
        // Nothing may follow the declared body.
        match tokio::time::timeout_at(deadline, recv.read_to_end(0)).await {
            Err(_) => return timed_out(&mut recv, &mut send),
            Ok(Err(ReadToEndError::TooLong)) => {
                let e = frame::FrameError::Length { declared: len, got: len + 1 };
                return self.refuse_garbled(&mut send, &mut recv, peer, remote, e).await;
            }
            Ok(Err(e)) => {
                tracing::debug!(node, %remote, %peer, error = %e, "request stream aborted by the peer");
                return;
            }
            Ok(Ok(_)) => {}
        }

        let handler = self.handler.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(handler) = handler else {
            tracing::debug!(node, %remote, %peer, ?kind, "request before the handler was attached; refused");
            reply(&mut send, frame::encode_refused(NOT_READY)).await;
            return;
        };
        let timeout = call_timeout(Some(kind));
        let out = tokio::time::timeout(timeout, handler.handle(peer_id, kind, body)).await;
        let answer = match out {
            Ok(Ok(payload)) if payload.len() + REPLY_HEADER_BYTES <= FRAME_BYTES_MAX => {
                bump(&self.counters.requests_served);
                frame::encode_ok(&payload)
            }
            Ok(Ok(payload)) => {
                bump(&self.counters.handler_errors);
                tracing::error!(node, %remote, %peer, ?kind, bytes = payload.len(), "reply over the size limit; refused");
                frame::encode_refused("reply over the size limit")
            }
            Ok(Err(reason)) => {
                bump(&self.counters.handler_errors);
                let shown: String = reason.chars().take(REASON_BYTES_MAX).collect();
                tracing::warn!(node, %remote, %peer, ?kind, error = %shown, "request refused by the handler");
                frame::encode_refused(&reason)
            }
            Err(_) => {
                bump(&self.counters.handler_errors);
                tracing::warn!(node, %remote, %peer, ?kind, timeout_ms = timeout.as_millis() as u64, "handler did not answer in time");
                frame::encode_refused("handler timed out")
            }
        };
        reply(&mut send, answer).await;
    }

    /// Refuse a request whose bytes are not a pickbox request (stop reading, answer, log).
    async fn refuse_garbled(
        &self,
        send: &mut SendStream,
        recv: &mut RecvStream,
        peer: &str,
        remote: SocketAddr,
        e: frame::FrameError,
    ) {
        bump(&self.counters.messages_garbled);
        tracing::warn!(node = self.node_id, %remote, %peer, error = %e, "refused a garbled message; closing the stream");
        let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
        reply(send, frame::encode_refused(&format!("garbled message: {e}"))).await;
    }

    /// Refuse a request whose declared body is over the limit for its kind, without reading it.
    async fn refuse_oversized(
        &self,
        send: &mut SendStream,
        recv: &mut RecvStream,
        peer: &str,
        remote: SocketAddr,
        bytes: usize,
    ) {
        bump(&self.counters.messages_oversized);
        tracing::warn!(node = self.node_id, %remote, %peer, bytes, "refused a message over the size limit");
        let _ = recv.stop(VarInt::from_u32(CODE_TOO_LONG));
        reply(send, frame::encode_refused("message over the size limit")).await;
    }
}

/// Read exactly `len` bytes of a request body, chunk by chunk into a buffer of that capacity (no
/// zero-filling first, and no bigger allocation than the declared length).
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, ReadExactError> {
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(ReadExactError::FinishedEarly(body.len())),
        }
    }
    Ok(body)
}

/// Write a whole reply and finish the stream (errors only mean the peer went away).
async fn reply(send: &mut SendStream, bytes: Vec<u8>) {
    if send.write_chunk(Bytes::from(bytes)).await.is_ok() {
        let _ = send.finish();
    }
}

/// Accept connections until the endpoint closes.
async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        tokio::spawn(inner.clone().serve_connection(incoming));
    }
}

/// `host:port` or `ip:port` to a socket address (the first one a name resolves to).
async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let lookup = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), tokio::net::lookup_host(addr)).await;
    match lookup {
        Err(_) => Err(format!("resolving {addr:?} timed out")),
        Ok(Err(e)) => Err(format!("bad peer address {addr:?}: {e}")),
        Ok(Ok(mut it)) => it.next().ok_or_else(|| format!("{addr:?} resolves to nothing")),
    }
}

/// One stream: write the request, finish, read the whole reply (bounded).
async fn exchange_on(conn: &Connection, mut chunks: Vec<Bytes>) -> Result<Vec<u8>, Failure> {
    let (send, mut recv) = conn.open_bi().await.map_err(|e| Failure::Connection(e.to_string()))?;
    let mut guard = ResetOnDrop(Some(send));
    let Some(send) = guard.0.as_mut() else { return Err(Failure::Stream("stream vanished".into())) };
    match send.write_all_chunks(&mut chunks).await {
        Ok(()) => {}
        Err(WriteError::ConnectionLost(e)) => return Err(Failure::Connection(e.to_string())),
        Err(WriteError::Stopped(code)) => {
            // The peer refused mid-request; its reply (if any) says why.
            let why = tokio::time::timeout(
                Duration::from_millis(CONNECT_TIMEOUT_MS),
                recv.read_to_end(REPLY_HEADER_BYTES + REASON_BYTES_MAX),
            )
            .await;
            return match why {
                Ok(Ok(r)) => match frame::decode_reply(r) {
                    Ok(Err(reason)) => Err(Failure::Stream(format!("refused by peer: {reason}"))),
                    _ => Err(Failure::Stream(format!("refused by peer: {}", code_reason(code)))),
                },
                _ => Err(Failure::Stream(format!("refused by peer: {}", code_reason(code)))),
            };
        }
        Err(e) => return Err(Failure::Stream(e.to_string())),
    }
    send.finish().map_err(|e| Failure::Stream(e.to_string()))?;
    guard.0 = None;
    drop(chunks);
    match recv.read_to_end(FRAME_BYTES_MAX).await {
        Ok(r) => Ok(r),
        Err(ReadToEndError::TooLong) => Err(Failure::Stream("reply over the size limit".into())),
        Err(ReadToEndError::Read(ReadError::ConnectionLost(e))) => Err(Failure::Connection(e.to_string())),
        Err(ReadToEndError::Read(ReadError::Reset(code))) => {
            Err(Failure::Stream(format!("reset by peer: {}", code_reason(code))))
        }
        Err(e) => Err(Failure::Stream(e.to_string())),
    }
}
