//! Nodes talking over QUIC with mutual TLS: a three-replica cluster on loopback, and the refusal
//! paths (foreign CA, oversized and garbled messages, dead peers).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pickbox::raft::network::{BoxFuture, PeerTransport, RpcKind, TransportError};
use pickbox::raft::{Replica, ReplicaConfig};
use pickbox::state::{read_range, Caller, FileKind, NodeId, Op, Outcome, ROOT_INO};
use pickbox::transport::frame::{self, FRAME_BYTES_MAX, MAGIC, VERSION};
use pickbox::transport::quic::CONNECT_TIMEOUT_MS;
use pickbox::transport::{
    create_ca, create_node_cert, node_name, CertError, NodeCertPaths, NodeIdentity, QuicConfig, QuicTransport,
    RpcHandler,
};

/// Everything the endpoints log, so tests can check that refusals are logged.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("pickbox=debug,openraft=warn"))
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        if std::env::var_os("TRANSPORT_TEST_LOG").is_some() {
            std::io::stderr().write_all(b)?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines containing every one of `words`.
fn log_lines(words: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines().filter(|l| words.iter().all(|w| l.contains(w))).map(str::to_string).collect()
}

/// A CA in `<root>/<ca>` and node certificates for `ids` in `<root>/<ca>-nodes`.
fn pki(root: &Path, ca: &str, ids: &[NodeId]) -> PathBuf {
    let ca_dir = root.join(ca);
    create_ca(&ca_dir).unwrap();
    for &id in ids {
        create_node_cert(&ca_dir, &node_name(id), &root.join(format!("{ca}-nodes"))).unwrap();
    }
    ca_dir
}

fn identity(root: &Path, ca: &str, id: NodeId) -> NodeIdentity {
    let paths = NodeCertPaths::in_dir(&root.join(format!("{ca}-nodes")), &node_name(id));
    NodeIdentity::load(&root.join(ca), &paths).unwrap()
}

fn bind(id: NodeId, identity: NodeIdentity) -> Arc<QuicTransport> {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    QuicTransport::bind(QuicConfig { node_id: id, listen, identity }).unwrap()
}

/// Answers "echo:" + the body.
struct Echo;

impl RpcHandler for Echo {
    fn handle(&self, _kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move { Ok([b"echo:".as_slice(), &body].concat()) })
    }
}

async fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_file(r: &Replica, name: &[u8]) -> Vec<u8> {
    let v = r.read().unwrap();
    let e = v.entry(ROOT_INO, name).unwrap().expect("entry");
    let inode = v.inode(e.ino).unwrap().expect("inode");
    read_range(&*v, &inode, 0, inode.size).unwrap().unwrap()
}

#[test]
fn certificates_are_written_private_and_bad_files_are_clear_errors() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let ca = pki(root.path(), "ca", &[1]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let paths = NodeCertPaths::in_dir(&root.path().join("ca-nodes"), "node1");
    assert_eq!(mode(&paths.key), 0o600);
    // The certificate names the node.
    let cert = pickbox::transport::certs::load_certs(&paths.cert).unwrap();
    assert_eq!(pickbox::transport::certs::cert_names(cert[0].as_ref()), vec!["node1".to_string()]);
    // Never overwritten.
    assert!(matches!(create_ca(&ca), Err(CertError::Exists(_))));
    assert!(matches!(create_node_cert(&ca, "node1", &root.path().join("ca-nodes")), Err(CertError::Exists(_))));
    // Missing and garbled files say which file and what is wrong.
    let missing = NodeIdentity::load(&ca, &NodeCertPaths::in_dir(root.path(), "node7")).unwrap_err();
    assert!(matches!(&missing, CertError::Missing(p) if p.ends_with("node7.pem")), "{missing}");
    std::fs::write(root.path().join("bad.pem"), b"-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    std::fs::write(root.path().join("bad.key"), b"hello").unwrap();
    let garbled = NodeIdentity::load(&ca, &NodeCertPaths::in_dir(root.path(), "bad")).unwrap_err();
    assert!(matches!(&garbled, CertError::Garbled { path, .. } if path.ends_with("bad.pem")), "{garbled}");
    std::fs::copy(&paths.cert, root.path().join("bad.pem")).unwrap();
    let garbled = NodeIdentity::load(&ca, &NodeCertPaths::in_dir(root.path(), "bad")).unwrap_err();
    assert!(matches!(&garbled, CertError::Garbled { path, .. } if path.ends_with("bad.key")), "{garbled}");
    let no_ca = create_node_cert(root.path(), "node2", root.path()).unwrap_err();
    assert!(matches!(&no_ca, CertError::Missing(p) if p.ends_with("ca.pem")), "{no_ca}");
}

/// (a) Three replicas over QUIC: node 1 bootstraps, adds 2 and 3 as learners then voters; writes on
/// the leader show up identically on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_replicate_over_quic() {
    logs();
    let root = tempfile::tempdir().unwrap();
    pki(root.path(), "ca", &[1, 2, 3]);
    let ts: Vec<_> = (1..=3).map(|id| bind(id, identity(root.path(), "ca", id))).collect();
    let addr = |i: usize| ts[i].local_addr().to_string();
    let cfg = |id: NodeId| ReplicaConfig::new(id, root.path().join(format!("data{id}")), Duration::from_secs(5));

    // Before a handler is attached, requests are refused (not hung).
    let early = ts[1].call(1, &addr(0), RpcKind::Vote, vec![1]).await.unwrap_err();
    assert!(matches!(&early, TransportError::Network(1, m) if m.contains("not ready")), "{early}");

    let a = Replica::start_with(cfg(1), ts[0].clone()).await.unwrap();
    ts[0].attach_replica(&a);
    let b = Replica::start_joining(cfg(2), ts[1].clone()).await.unwrap();
    ts[1].attach_replica(&b);
    let c = Replica::start_joining(cfg(3), ts[2].clone()).await.unwrap();
    ts[2].attach_replica(&c);

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let make = Op::MakeNode { parent: ROOT_INO, name: b"f".to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 };
    let Outcome::Inode(f) = a.propose(Caller::root(), make).await.unwrap() else { panic!("not an inode") };
    a.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data[..1000].to_vec(), append: false })
        .await
        .unwrap();

    let t = Instant::now();
    a.add_learner(2, addr(1)).await.unwrap();
    a.add_learner(3, addr(2)).await.unwrap();
    a.change_voters([1, 2, 3].into_iter().collect()).await.unwrap();
    eprintln!("two learners added and promoted in {:?}", t.elapsed());

    let t = Instant::now();
    a.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data.clone(), append: false }).await.unwrap();
    let make = Op::MakeNode { parent: ROOT_INO, name: b"g".to_vec(), kind: FileKind::File, perm: 0o600, rdev: 0 };
    a.propose(Caller::root(), make).await.unwrap();
    eprintln!("two proposals committed by three voters in {:?}", t.elapsed());

    let target = a.applied_index().unwrap();
    for r in [&b, &c] {
        wait_until("followers to apply", Duration::from_secs(10), || r.applied_index().unwrap_or(0) >= target).await;
    }
    for r in [&a, &b, &c] {
        assert_eq!(read_file(r, b"f"), data, "node {}", r.node_id());
        assert!(r.read().unwrap().entry(ROOT_INO, b"g").unwrap().is_some());
        assert_eq!(r.read().unwrap().meta().unwrap(), a.read().unwrap().meta().unwrap());
    }
    assert!(!log_lines(&["connected to peer", "peer=node2"]).is_empty(), "peer names are logged");

    // A well-framed Raft message with a garbled body is refused by the replica, and logged.
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let err = ts[0].call(2, &addr(1), RpcKind::AppendEntries, junk).await.unwrap_err();
    assert!(matches!(&err, TransportError::Network(2, m) if m.contains("refused by peer")), "{err}");
    assert!(ts[1].stats().handler_errors >= 1);
    assert!(!log_lines(&["request refused by the handler", "node=2"]).is_empty());
    // ...and the cluster still works.
    a.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: b"after".to_vec(), append: false })
        .await
        .unwrap();
    let target = a.applied_index().unwrap();
    for r in [&b, &c] {
        wait_until("followers to apply", Duration::from_secs(10), || r.applied_index().unwrap_or(0) >= target).await;
        assert_eq!(&read_file(r, b"f")[..5], b"after");
    }

    for r in [&c, &b, &a] {
        r.shutdown().await.unwrap();
    }
    for t in &ts {
        t.shutdown().await;
    }
}

/// (b) A client whose certificate comes from another CA is refused, and the server logs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_foreign_ca_is_refused() {
    logs();
    let root = tempfile::tempdir().unwrap();
    pki(root.path(), "ca", &[1, 2]);
    pki(root.path(), "rogue", &[9]);
    let server = bind(1, identity(root.path(), "ca", 1));
    server.attach(Arc::new(Echo));
    let addr = server.local_addr().to_string();

    // The rogue trusts the cluster CA (so it accepts the server) but presents a foreign certificate.
    let mut rogue_id = identity(root.path(), "rogue", 9);
    rogue_id.ca = identity(root.path(), "ca", 1).ca;
    let rogue = bind(9, rogue_id);
    let err = rogue.call(1, &addr, RpcKind::Vote, b"let me in".to_vec()).await.unwrap_err();
    eprintln!("rogue client: {err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    wait_until("the refusal to be counted", Duration::from_secs(5), || server.stats().handshakes_refused >= 1).await;
    assert_eq!(server.stats().requests_served, 0);
    let refused = log_lines(&["refused a peer", "node=1"]);
    assert!(refused.iter().any(|l| l.contains("invalid peer certificate: UnknownIssuer")), "{refused:?}");

    // A member of the cluster is served by the same server.
    let member = bind(2, identity(root.path(), "ca", 2));
    let reply = member.call(1, &addr, RpcKind::Vote, b"hi".to_vec()).await.unwrap();
    assert_eq!(reply, b"echo:hi");

    // A server whose certificate is not the node the client meant to reach is refused by the client.
    let err = member.call(3, &addr, RpcKind::Vote, b"hi".to_vec()).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(3, _)), "{err}");

    // An authorizer (for example the Raft membership) can refuse a peer the CA vouches for.
    server.set_authorizer(Arc::new(|peer: Option<NodeId>, _kind: RpcKind| peer == Some(3)));
    let err = member.call(1, &addr, RpcKind::Vote, b"hi".to_vec()).await.unwrap_err();
    assert!(matches!(&err, TransportError::Network(1, m) if m.contains("not authorized")), "{err}");
    assert_eq!(server.stats().requests_unauthorized, 1);
    assert!(!log_lines(&["peer not authorized", "peer=node2", "peer_id=Some(2)"]).is_empty());
    server.set_authorizer(Arc::new(|peer: Option<NodeId>, _kind: RpcKind| peer == Some(2)));
    assert_eq!(member.call(1, &addr, RpcKind::Vote, b"hi".to_vec()).await.unwrap(), b"echo:hi");

    for t in [&server, &rogue, &member] {
        t.shutdown().await;
    }
}

/// (c) A message over the limit is refused without harming the server, which then serves a normal
/// call; the client refuses to send one in the first place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_and_server_keeps_serving() {
    logs();
    let root = tempfile::tempdir().unwrap();
    pki(root.path(), "ca", &[1, 2]);
    let server = bind(1, identity(root.path(), "ca", 1));
    server.attach(Arc::new(Echo));
    let client = bind(2, identity(root.path(), "ca", 2));
    let addr = server.local_addr().to_string();

    let mut big = vec![0u8; FRAME_BYTES_MAX + 1];
    big[..3].copy_from_slice(&[MAGIC, VERSION, frame::kind_code(RpcKind::AppendEntries)]);
    let t = Instant::now();
    let err = client.call_raw(1, &addr, big).await.unwrap_err();
    eprintln!("oversized message refused in {:?}: {err}", t.elapsed());
    assert!(matches!(&err, TransportError::Network(1, m) if m.contains("limit")), "{err}");
    assert_eq!(server.stats().messages_oversized, 1);
    assert!(!log_lines(&["refused a message over the size limit", "node=1", "peer=node2"]).is_empty());

    let body = vec![1u8; pickbox::config::MESSAGE_BYTES_MAX + 1];
    let err = client.call(1, &addr, RpcKind::AppendEntries, body).await.unwrap_err();
    assert!(matches!(&err, TransportError::Network(1, m) if m.contains("limit")), "{err}");

    assert_eq!(client.call(1, &addr, RpcKind::Vote, b"still there?".to_vec()).await.unwrap(), b"echo:still there?");
    // A large message under the limit goes through whole.
    let body: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let t = Instant::now();
    let reply = client.call(1, &addr, RpcKind::InstallSnapshot, body.clone()).await.unwrap();
    eprintln!("8 MiB echo in {:?}", t.elapsed());
    assert_eq!(&reply[5..], &body[..]);
    server.shutdown().await;
    client.shutdown().await;
}

/// (d) Random bytes are refused and logged; the server keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_message_is_refused_and_server_keeps_serving() {
    logs();
    let root = tempfile::tempdir().unwrap();
    pki(root.path(), "ca", &[1, 2]);
    let server = bind(1, identity(root.path(), "ca", 1));
    server.attach(Arc::new(Echo));
    let client = bind(2, identity(root.path(), "ca", 2));
    let addr = server.local_addr().to_string();

    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let junk: Vec<u8> = (0..1000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for frame in [junk, vec![], vec![MAGIC], vec![MAGIC, VERSION, 60, 1, 2], vec![MAGIC, 200, 1]] {
        let err = client.call_raw(1, &addr, frame.clone()).await.unwrap_err();
        assert!(matches!(&err, TransportError::Network(1, m) if m.contains("garbled")), "{frame:?}: {err}");
    }
    assert_eq!(server.stats().messages_garbled, 5);
    assert!(log_lines(&["refused a garbled message", "node=1", "peer=node2"]).len() >= 5);
    assert_eq!(client.call(1, &addr, RpcKind::Vote, b"ok".to_vec()).await.unwrap(), b"echo:ok");
    let t = Instant::now();
    for i in 0..500u32 {
        client.call(1, &addr, RpcKind::Vote, i.to_le_bytes().repeat(25)).await.unwrap();
    }
    eprintln!("500 sequential 100-byte calls: {:?}/call", t.elapsed() / 500);
    // Many concurrent calls share one connection.
    let calls = (0..200u32).map(|i| client.call(1, &addr, RpcKind::Vote, i.to_le_bytes().to_vec()));
    let t = Instant::now();
    let replies = futures::future::join_all(calls).await;
    eprintln!("200 concurrent calls in {:?}", t.elapsed());
    assert!(replies.iter().all(|r| r.is_ok()));
    assert_eq!(client.stats().dials, 1);
    server.shutdown().await;
    client.shutdown().await;
}

/// (e) A call to a dead peer returns Unreachable within a bounded time, also once a peer that was
/// connected goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_is_unreachable_quickly() {
    logs();
    let root = tempfile::tempdir().unwrap();
    pki(root.path(), "ca", &[1, 2]);
    let client = bind(2, identity(root.path(), "ca", 2));
    let bound = Duration::from_millis(CONNECT_TIMEOUT_MS + 1_000);

    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let t = Instant::now();
    let err = client.call(1, &dead, RpcKind::Vote, b"anyone?".to_vec()).await.unwrap_err();
    eprintln!("dead peer: {err} after {:?}", t.elapsed());
    assert!(matches!(err, TransportError::Unreachable(1, _)), "{err}");
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());

    let err = client.call(1, "no-such-host.invalid:1", RpcKind::Vote, vec![]).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(1, _)), "{err}");

    let server = bind(1, identity(root.path(), "ca", 1));
    server.attach(Arc::new(Echo));
    let addr = server.local_addr().to_string();
    assert_eq!(client.call(1, &addr, RpcKind::Vote, b"x".to_vec()).await.unwrap(), b"echo:x");
    server.shutdown().await;
    drop(server);
    let t = Instant::now();
    let err = client.call(1, &addr, RpcKind::Vote, b"x".to_vec()).await.unwrap_err();
    eprintln!("stopped peer: {err} after {:?}", t.elapsed());
    assert!(matches!(err, TransportError::Unreachable(1, _)), "{err}");
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());
    client.shutdown().await;
}

/// A learner that joins after many large writes must catch up through large AppendEntries.
/// openraft 0.9 bounds every AppendEntries by `heartbeat_interval` (100 ms here), and a 16-entry
/// message of 1 MiB entries takes longer: measured 13-23 timeouts, catch-up in 0.8-3.4 s.
#[ignore = "measurement of openraft's AppendEntries timeout with large entries; run by hand"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_catches_up_after_large_writes() {
    logs();
    let root = tempfile::tempdir().unwrap();
    pki(root.path(), "ca", &[1, 2]);
    let ts: Vec<_> = (1..=2).map(|id| bind(id, identity(root.path(), "ca", id))).collect();
    let cfg = |id: NodeId| ReplicaConfig::new(id, root.path().join(format!("data{id}")), Duration::from_secs(5));
    let a = Replica::start_with(cfg(1), ts[0].clone()).await.unwrap();
    ts[0].attach_replica(&a);
    let b = Replica::start_joining(cfg(2), ts[1].clone()).await.unwrap();
    ts[1].attach_replica(&b);
    let make = Op::MakeNode { parent: ROOT_INO, name: b"big".to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 };
    let Outcome::Inode(f) = a.propose(Caller::root(), make).await.unwrap() else { panic!("not an inode") };
    let mib: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    for i in 0..40u64 {
        a.propose(Caller::root(), Op::Write { ino: f.ino, offset: i << 20, data: mib.clone(), append: false })
            .await
            .unwrap();
    }
    let t = Instant::now();
    let res = a.add_learner(2, ts[1].local_addr().to_string()).await;
    eprintln!(
        "learner after 40 MiB: {res:?} in {:?}; leader {:?}, learner {:?}",
        t.elapsed(),
        a.metrics(),
        b.metrics()
    );
    res.unwrap();
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    for t in &ts {
        t.shutdown().await;
    }
}
