//! The QUIC endpoint of a node: server and client at once, mutual TLS against the cluster CA.
//!
//! One long-lived connection per peer (dialled on first use, cached, redialled once it has
//! failed); one bidirectional stream per RPC, read to its end with a size limit on both sides.
//! Architecture Invariant: nothing here decodes a message body; bodies go to the `RpcHandler`.
//! Peers are authenticated (a certificate signed by the cluster CA, with ClientAuth), and the
//! dialler checks that the server's certificate names the node it meant to reach. Authorising an
//! authenticated peer (for example against the Raft membership) is the job of an optional
//! `PeerAuthorizer`, asked for every request; without one every CA-signed peer is served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ReadError, ReadToEndError, RecvStream, SendStream, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use super::certs::{cert_names, node_id_from_name, node_name, NodeIdentity};
use super::frame::{self, FRAME_BYTES_MAX, REASON_BYTES_MAX, REPLY_HEADER_BYTES};
use super::{PeerAuthorizer, RpcHandler};
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
/// Concurrent RPC streams a peer may open on one connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 128;
/// Concurrent incoming connections; beyond this new ones are refused.
pub const CONNECTIONS_MAX: usize = 256;
/// How long shutdown waits for connections to close cleanly.
pub const SHUTDOWN_WAIT_MS: u64 = 1_000;

/// Stream error code: the message was over `FRAME_BYTES_MAX`.
pub const CODE_TOO_LONG: u32 = 1;
/// Stream error code: the request did not arrive in time.
pub const CODE_TIMEOUT: u32 = 2;
/// Stream error code: the caller gave up (its future was dropped).
pub const CODE_CANCELLED: u32 = 3;

/// Why the endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The certificates or key were refused by rustls (wrong kind, key does not match, ...).
    #[error("TLS configuration: {0}")]
    Tls(String),
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
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A cached connection to one peer and the address it was dialled at.
struct Cached {
    addr: SocketAddr,
    conn: Connection,
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

/// The server and client configurations of a node.
fn configs(identity: &NodeIdentity) -> Result<(quinn::ServerConfig, quinn::ClientConfig), SetupError> {
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
    let transport = Arc::new(transport);

    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).map_err(tls_err)?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).map_err(tls_err)?));
    client.transport_config(transport);
    Ok((server, client))
}

/// The names in the verified certificate of the other side of `conn`, for logs.
fn peer_name(conn: &Connection) -> String {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|leaf| cert_names(leaf.as_ref()).join(",")))
        .unwrap_or_else(|| "<no certificate>".into())
}

impl QuicTransport {
    /// Bind the endpoint and start accepting. Must be called inside a tokio runtime. Incoming
    /// requests are refused until a handler is attached.
    pub fn bind(cfg: QuicConfig) -> Result<Arc<QuicTransport>, SetupError> {
        let (server, client) = configs(&cfg.identity)?;
        let mut endpoint = quinn::Endpoint::server(server, cfg.listen)
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
        }
    }

    /// Send `frame` exactly as given (no header, no size check) and return the raw reply: for
    /// tests of the server's refusal paths (garbled or oversized messages).
    #[doc(hidden)]
    pub async fn call_raw(&self, target: NodeId, addr: &str, frame: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        self.inner.exchange(target, addr, frame).await
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
            let frame =
                frame::encode_request(kind, &body).map_err(|e| TransportError::Network(target, e.to_string()))?;
            drop(body);
            inner.exchange(target, &addr, frame).await
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
        _ => format!("stream error code {code}"),
    }
}

impl Inner {
    fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// One request/reply exchange with `target` at `addr`, bounded by `CALL_TIMEOUT_MS`.
    async fn exchange(&self, target: NodeId, addr: &str, frame: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let sock = resolve(addr).await.map_err(|e| TransportError::Unreachable(target, e))?;
        let conn = self.connection(target, sock).await?;
        let call = tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), exchange_on(&conn, frame)).await;
        let reply = match call {
            Err(_) => {
                self.forget(target, &conn);
                return Err(TransportError::Unreachable(target, format!("no reply within {CALL_TIMEOUT_MS} ms")));
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
            Ok(Err(reason)) => Err(TransportError::Network(target, format!("refused by peer: {reason}"))),
            Err(e) => Err(TransportError::Network(target, format!("bad reply: {e}"))),
        }
    }

    /// The cached connection to `target`, or a new one if there is none, it failed, or the
    /// address changed. Concurrent calls to one peer share one dial.
    async fn connection(&self, target: NodeId, addr: SocketAddr) -> Result<Connection, TransportError> {
        let slot = self.peers.lock().unwrap_or_else(|e| e.into_inner()).entry(target).or_default().clone();
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.addr == addr && c.conn.close_reason().is_none() {
                return Ok(c.conn.clone());
            }
        }
        *cached = None;
        bump(&self.counters.dials);
        let name = node_name(target);
        let connecting = self
            .endpoint
            .connect(addr, &name)
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
        *cached = Some(Cached { addr, conn: conn.clone() });
        Ok(conn)
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

    /// Serve one RPC stream: read the request (bounded), check its header, call the handler,
    /// write the reply. Every refusal is answered and logged; nothing here panics on input.
    async fn serve_stream(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
        peer: &str,
        peer_id: Option<NodeId>,
        remote: SocketAddr,
    ) {
        let node = self.node_id;
        let read =
            tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), recv.read_to_end(FRAME_BYTES_MAX)).await;
        let frame = match read {
            Err(_) => {
                tracing::warn!(node, %remote, %peer, timeout_ms = CALL_TIMEOUT_MS, "request not received in time; closing the stream");
                let _ = recv.stop(VarInt::from_u32(CODE_TIMEOUT));
                let _ = send.reset(VarInt::from_u32(CODE_TIMEOUT));
                return;
            }
            Ok(Err(ReadToEndError::TooLong)) => {
                bump(&self.counters.messages_oversized);
                tracing::warn!(node, %remote, %peer, limit = FRAME_BYTES_MAX, "refused a message over the size limit");
                let _ = recv.stop(VarInt::from_u32(CODE_TOO_LONG));
                reply(&mut send, frame::encode_refused("message over the size limit")).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(node, %remote, %peer, error = %e, "request stream aborted by the peer");
                return;
            }
            Ok(Ok(f)) => f,
        };
        let len = frame.len();
        let (kind, body) = match frame::decode_request(frame) {
            Ok(r) => r,
            Err(e) => {
                bump(&self.counters.messages_garbled);
                tracing::warn!(node, %remote, %peer, bytes = len, error = %e, "refused a garbled message; closing the stream");
                reply(&mut send, frame::encode_refused(&format!("garbled message: {e}"))).await;
                return;
            }
        };
        let authorizer = self.authorizer.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(auth) = authorizer {
            if !auth.authorize(peer_id, kind) {
                bump(&self.counters.requests_unauthorized);
                tracing::warn!(node, %remote, %peer, ?peer_id, ?kind, "refused a request: peer not authorized");
                reply(&mut send, frame::encode_refused("not authorized")).await;
                return;
            }
        }
        let handler = self.handler.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(handler) = handler else {
            tracing::debug!(node, %remote, %peer, ?kind, "request before the handler was attached; refused");
            reply(&mut send, frame::encode_refused("node not ready: no handler attached")).await;
            return;
        };
        let out = tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), handler.handle(kind, body)).await;
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
                tracing::warn!(node, %remote, %peer, ?kind, timeout_ms = CALL_TIMEOUT_MS, "handler did not answer in time");
                frame::encode_refused("handler timed out")
            }
        };
        reply(&mut send, answer).await;
    }
}

/// Write a whole reply and finish the stream (errors only mean the peer went away).
async fn reply(send: &mut SendStream, bytes: Vec<u8>) {
    if send.write_all(&bytes).await.is_ok() {
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
async fn exchange_on(conn: &Connection, frame: Vec<u8>) -> Result<Vec<u8>, Failure> {
    let (send, mut recv) = conn.open_bi().await.map_err(|e| Failure::Connection(e.to_string()))?;
    let mut guard = ResetOnDrop(Some(send));
    let Some(send) = guard.0.as_mut() else { return Err(Failure::Stream("stream vanished".into())) };
    match send.write_all(&frame).await {
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
    drop(frame);
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
