//! `cargo bench --bench transport`: what the node-to-node transport (QUIC, mutual TLS, one
//! stream per call) costs on loopback, against plain TCP on loopback in the same run (the
//! kernel's ceiling for moving the same bytes between two sockets, without encryption).
//!
//! Workloads, shaped like Raft replication: a stream of 4 MiB calls to one peer (a follower
//! catching up or a large write), the same to two peers at once (a leader of three), and small
//! calls one after another (an AppendEntries of one create). Every call is answered with 8 bytes.
//! Both ends run in this process on a multi-threaded tokio runtime, so the CPU figures (this
//! process, user + system) cover sender and receivers together.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pickbox::raft::network::{BoxFuture, PeerTransport, RpcKind};
use pickbox::state::NodeId;
use pickbox::transport::{
    create_ca, create_node_cert, node_name, NodeCertPaths, NodeIdentity, QuicConfig, QuicTransport, RpcHandler,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG_CALL_BYTES: usize = 4 << 20;
const SMALL_CALL_BYTES: usize = 300;

/// How many calls of each kind: the full run under `cargo bench`; a few under `cargo test
/// --all-targets` (which runs this binary without `--bench`), so the benchmark is kept working.
#[derive(Clone, Copy)]
struct Counts {
    big: usize,
    small: usize,
}

/// Process CPU time (user + system) so far.
fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid initial value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Wall time and CPU time of `f`.
async fn measure<F: std::future::Future<Output = ()>>(f: F) -> (Duration, Duration) {
    let (t, c) = (Instant::now(), cpu());
    f.await;
    (t.elapsed(), cpu() - c)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The two ways to make a call: body in, 8-byte answer out.
trait Caller: Send + Sync + 'static {
    fn call(&self, peer: usize, body: Vec<u8>) -> BoxFuture<Vec<u8>>;
}

// ---------------------------------------------------------------------------------------- QUIC

struct Ack;

impl RpcHandler for Ack {
    fn handle(&self, _peer: Option<NodeId>, _kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        let n = body.len() as u64;
        Box::pin(async move { Ok(n.to_le_bytes().to_vec()) })
    }
}

struct Quic {
    from: Arc<QuicTransport>,
    /// (node id, address) of each peer.
    peers: Vec<(NodeId, String)>,
    _all: Vec<Arc<QuicTransport>>,
}

impl Quic {
    fn new(root: &Path, peers: usize) -> Quic {
        let ca = root.join("ca");
        create_ca(&ca).unwrap();
        let ids: Vec<NodeId> = (1..=peers as NodeId + 1).collect();
        let all: Vec<Arc<QuicTransport>> = ids
            .iter()
            .map(|&id| {
                create_node_cert(&ca, &node_name(id), &root.join("nodes")).unwrap();
                let paths = NodeCertPaths::in_dir(&root.join("nodes"), &node_name(id));
                let identity = NodeIdentity::load(&ca, &paths).unwrap();
                let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
                let t = QuicTransport::bind(QuicConfig { node_id: id, listen, identity }).unwrap();
                t.attach(Arc::new(Ack));
                t
            })
            .collect();
        let peers = all[1..].iter().zip(&ids[1..]).map(|(t, &id)| (id, t.local_addr().to_string())).collect();
        Quic { from: all[0].clone(), peers, _all: all }
    }
}

impl Caller for Quic {
    fn call(&self, peer: usize, body: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let (id, addr) = self.peers[peer].clone();
        let from = self.from.clone();
        Box::pin(async move { from.call(id, &addr, RpcKind::AppendEntries, body).await.expect("QUIC call failed") })
    }
}

// ----------------------------------------------------------------------------------------- TCP

/// One connection per peer, calls one at a time on it: `[u32 length][body]`, answer 8 bytes.
struct Tcp {
    conns: Vec<Arc<tokio::sync::Mutex<tokio::net::TcpStream>>>,
}

impl Tcp {
    async fn new(peers: usize) -> Tcp {
        let mut conns = Vec::new();
        for _ in 0..peers {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut body = Vec::new();
                loop {
                    let Ok(n) = s.read_u32_le().await else { return };
                    body.resize(n as usize, 0);
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if s.write_all(&(n as u64).to_le_bytes()).await.is_err() {
                        return;
                    }
                }
            });
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            conns.push(Arc::new(tokio::sync::Mutex::new(s)));
        }
        Tcp { conns }
    }
}

impl Caller for Tcp {
    fn call(&self, peer: usize, body: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let conn = self.conns[peer].clone();
        Box::pin(async move {
            let mut s = conn.lock().await;
            s.write_all(&(body.len() as u32).to_le_bytes()).await.unwrap();
            s.write_all(&body).await.unwrap();
            let mut answer = vec![0u8; 8];
            s.read_exact(&mut answer).await.unwrap();
            answer
        })
    }
}

// ------------------------------------------------------------------------------------ workloads

struct Figures {
    stream: (Duration, Duration),
    fan_out: (Duration, Duration),
    small: (Duration, Duration),
    small_p50: Duration,
    small_p99: Duration,
}

async fn run(c: Arc<dyn Caller>, n: Counts) -> Figures {
    let body: Vec<u8> = (0..BIG_CALL_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    let answer = |a: Vec<u8>, n: usize| assert_eq!(a, (n as u64).to_le_bytes(), "wrong answer");
    // Warm-up: connections, handshakes, congestion windows.
    for _ in 0..4 {
        answer(c.call(0, body.clone()).await, body.len());
    }
    let stream = measure(async {
        for _ in 0..n.big {
            answer(c.call(0, body.clone()).await, body.len());
        }
    })
    .await;
    for _ in 0..4 {
        answer(c.call(1, body.clone()).await, body.len());
    }
    let fan_out = measure(async {
        for _ in 0..n.big {
            let (a, b) = tokio::join!(c.call(0, body.clone()), c.call(1, body.clone()));
            answer(a, body.len());
            answer(b, body.len());
        }
    })
    .await;
    let small_body = vec![7u8; SMALL_CALL_BYTES];
    let mut times = Vec::with_capacity(n.small);
    let small = measure(async {
        for _ in 0..n.small {
            let t = Instant::now();
            answer(c.call(0, small_body.clone()).await, SMALL_CALL_BYTES);
            times.push(t.elapsed());
        }
    })
    .await;
    times.sort();
    Figures { stream, fan_out, small, small_p50: percentile(&times, 0.5), small_p99: percentile(&times, 0.99) }
}

fn main() {
    let n = if std::env::args().any(|a| a == "--bench") {
        Counts { big: 64, small: 3000 }
    } else {
        Counts { big: 2, small: 20 }
    };
    pickbox::transport::quic::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let root = tempfile::tempdir().unwrap();
    let (quic, tcp) = rt.block_on(async {
        let quic = run(Arc::new(Quic::new(root.path(), 2)), n).await;
        let tcp = run(Arc::new(Tcp::new(2).await), n).await;
        (quic, tcp)
    });
    let mib = (BIG_CALL_BYTES * n.big) as f64 / (1024.0 * 1024.0);
    let rate = |d: Duration, k: f64| k * mib / d.as_secs_f64();
    println!("transport on loopback: QUIC + mutual TLS vs plain TCP, same run (ratio = TCP time / QUIC time)");
    println!("{:44} {:>12} {:>12} {:>7}", "workload", "QUIC", "TCP", "ratio");
    let line = |name: &str, q: (Duration, Duration), t: (Duration, Duration), k: f64| {
        println!("{name:44} {:>7.0} MiB/s {:>7.0} MiB/s {:>6.0}%", rate(q.0, k), rate(t.0, k), 100.0 * t.0.as_secs_f64() / q.0.as_secs_f64());
        println!(
            "{:44} {:>9.2} s   {:>9.2} s  (CPU per {:.0} MiB, both ends)",
            "",
            q.1.as_secs_f64(),
            t.1.as_secs_f64(),
            k * mib
        );
    };
    line(&format!("{} x 4 MiB calls to one peer", n.big), quic.stream, tcp.stream, 1.0);
    line(&format!("{} x 4 MiB calls to two peers at once", n.big), quic.fan_out, tcp.fan_out, 2.0);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{:44} {:>6.0} us p50 {:>6.0} us p50 {:>6.0}%",
        format!("{} x {SMALL_CALL_BYTES} B calls, one at a time", n.small),
        us(quic.small_p50),
        us(tcp.small_p50),
        100.0 * us(tcp.small_p50) / us(quic.small_p50)
    );
    println!("{:44} {:>6.0} us p99 {:>6.0} us p99", "", us(quic.small_p99), us(tcp.small_p99));
    println!(
        "{:44} {:>6.0} us     {:>6.0} us      (CPU per call, both ends)",
        "",
        us(quic.small.1) / n.small as f64,
        us(tcp.small.1) / n.small as f64
    );
}
