//! Membership against a real etcd: each test starts its own `etcd` on free loopback ports (Debian
//! package `etcd-server`), registers nodes, watches the view, and kills and restarts etcd.
//! Every wait polls the view channel under a deadline; none sleeps for a fixed time.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_common::membership::{
    watch, ClusterSnapshot, MembershipConfig, MembershipError, Registration,
};
use pd_common::ErrorKind;
use pd_proto::v1::{ModelFingerprint, NodeInfo, NodeRole};
use prost::Message;
use tokio::sync::watch::Receiver;

/// How long etcd may take to start and elect itself leader.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a change may take to reach the view when nothing has to expire.
const PROPAGATION: Duration = Duration::from_secs(5);
/// How long the view and the registrations may take to find etcd again after it restarts.
const RECOVERY: Duration = Duration::from_secs(20);

/// One etcd member on loopback; killed when dropped.
struct Etcd {
    child: Option<Child>,
    client_url: String,
    peer_url: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut etcd = Etcd {
            child: None,
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir,
        };
        etcd.spawn().await;
        etcd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts etcd on this member's ports and data dir and waits until it serves with a leader.
    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new("etcd")
            .arg("--name=default")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={}", self.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url))
            .arg(format!("--initial-cluster=default={}", self.peer_url))
            // A short election makes start-up and restarts quick; leases shorter than 1.5
            // election timeouts would be stretched by etcd.
            .args(["--heartbeat-interval=50", "--election-timeout=500"])
            .args(["--logger=zap", "--log-outputs=stderr"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the `etcd` binary is not on PATH: install it (Debian/Ubuntu: \
                 `apt-get install etcd-server`; deploy/test.sh does this)"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("etcd exited with {status}:\n{}", self.log());
                }
            }
            if self.is_ready().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not ready within {ETCD_READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn is_ready(&self) -> bool {
        let probe = async {
            let mut client = etcd_client::Client::connect([self.client_url.as_str()], None)
                .await
                .ok()?;
            let status = client.status().await.ok()?;
            (status.leader() != 0).then_some(())
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Some(()))
        )
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data dir.
    async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Kills etcd and starts it on the same ports with its data gone, leases included.
    async fn restart_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.data_dir()).expect("remove etcd data");
        self.spawn().await;
    }

    fn config(&self, lease_ttl_secs: u64) -> MembershipConfig {
        MembershipConfig {
            etcd_endpoints: vec![self.client_url.clone()],
            cluster: "pd-test".into(),
            lease_ttl_secs,
            ..Default::default()
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Logs of the membership tasks, shown with a failing test's output.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pd_common=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn node(node_id: &str, role: NodeRole) -> NodeInfo {
    let mut info = NodeInfo {
        node_id: node_id.into(),
        address: format!("127.0.0.1:{}", free_port()),
        metrics_address: "127.0.0.1:9100".into(),
        fingerprint: Some(ModelFingerprint {
            model_id: "SmolLM2-135M".into(),
            kv_dtype: "f16".into(),
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
        }),
        kv_blocks_total: 1024,
        device: "cpu".into(),
        version: "test".into(),
        transfer_backends: vec![pd_proto::v1::KvTransferBackend::Grpc as i32],
        ..Default::default()
    };
    info.set_role(role);
    info
}

/// Waits until the view satisfies `ready`, or fails the test naming `what`.
async fn wait_view(
    view: &mut Receiver<Arc<ClusterSnapshot>>,
    within: Duration,
    what: &str,
    ready: impl FnMut(&Arc<ClusterSnapshot>) -> bool,
) -> Arc<ClusterSnapshot> {
    let waited = tokio::time::timeout(within, view.wait_for(ready))
        .await
        .map(|changed| changed.map(|snapshot| snapshot.clone()));
    match waited {
        Ok(Ok(snapshot)) => snapshot,
        Ok(Err(_)) => panic!("the membership watch ended while waiting for {what}"),
        Err(_) => panic!(
            "no {what} within {within:?}; view: {:?}",
            view.borrow().clone()
        ),
    }
}

async fn wait_registered(registration: &Registration, want: bool, within: Duration) {
    let mut state = registration.subscribe();
    let waited = tokio::time::timeout(within, state.wait_for(|r| *r == want)).await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "registration {} not {} within {within:?}",
        registration.key(),
        if want { "registered" } else { "unregistered" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_the_view_and_deregistering_removes_them_at_once() {
    init_logs();
    let etcd = Etcd::start().await;
    let config = etcd.config(10);

    let prefill = node("p0", NodeRole::Prefill);
    let _p0 = Registration::register(&config, &prefill).await.unwrap();
    let membership = watch(&config).await.unwrap();
    // The first snapshot comes from the initial list: no waiting.
    let first = membership.current();
    assert!(first.etcd_connected);
    assert!(first.last_contact.is_some());
    assert_eq!(first.prefill.get("p0"), Some(&prefill));
    assert_eq!(first.node("p0"), Some(&prefill));
    assert_eq!(first.len(), 1);

    // A node registered after the watch started joins it.
    let mut view = membership.subscribe();
    let decode = node("d0", NodeRole::Decode);
    let d0 = Registration::register(&config, &decode).await.unwrap();
    assert_eq!(d0.key(), "/pd-test/nodes/decode/d0");
    assert!(d0.is_registered());
    let seen = wait_view(&mut view, PROPAGATION, "d0 in the view", |s| {
        s.decode.contains_key("d0")
    })
    .await;
    assert_eq!(seen.nodes(NodeRole::Decode).get("d0"), Some(&decode));
    assert_eq!(seen.nodes(NodeRole::Prefill).get("p0"), Some(&prefill));
    assert!(seen.router.is_empty());

    // Revoking the lease deletes the key now, far sooner than the 10 s TTL.
    let started = Instant::now();
    d0.deregister().await.unwrap();
    let after = wait_view(&mut view, Duration::from_secs(2), "d0 leaving", |s| {
        !s.decode.contains_key("d0")
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(after.prefill.contains_key("p0"), "p0 must stay: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_auth_on_only_the_right_user_registers_and_watches() {
    init_logs();
    let etcd = Etcd::start().await;
    let mut admin = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    // etcd's auth needs a root user in the root role; pd nodes use their own user here.
    let _ = admin.role_add("root").await;
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("pd", "pd-pw", None).await.unwrap();
    admin.user_grant_role("pd", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let with = |user: Option<(&str, &str)>| MembershipConfig {
        etcd_user: user.map(|u| u.0.to_string()),
        etcd_password: user.map(|u| u.1.to_string()),
        ..etcd.config(10)
    };
    let decode = node("d0", NodeRole::Decode);
    for refused in [None, Some(("pd", "wrong")), Some(("nobody", "pd-pw"))] {
        let answer = Registration::register(&with(refused), &decode).await;
        assert!(answer.is_err(), "{refused:?} registered");
    }
    let registered = Registration::register(&with(Some(("pd", "pd-pw"))), &decode)
        .await
        .expect("the right user registers");
    let membership = watch(&with(Some(("pd", "pd-pw")))).await.unwrap();
    assert_eq!(membership.current().decode.get("d0"), Some(&decode));
    registered.deregister().await.unwrap();
    // Half a pair of credentials is a configuration error, not a silent anonymous login.
    let half = MembershipConfig {
        etcd_user: Some("pd".into()),
        ..etcd.config(10)
    };
    let err = Registration::register(&half, &decode).await.err().unwrap();
    assert!(matches!(err, MembershipError::InvalidConfig(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_renewing_leaves_after_its_ttl() {
    init_logs();
    let etcd = Etcd::start().await;
    let ttl = Duration::from_secs(2);
    let config = etcd.config(ttl.as_secs());
    let membership = watch(&config).await.unwrap();
    let mut view = membership.subscribe();

    let decode = node("d0", NodeRole::Decode);
    let d0 = Registration::register(&config, &decode).await.unwrap();
    wait_view(&mut view, PROPAGATION, "d0 in the view", |s| {
        s.decode.contains_key("d0")
    })
    .await;

    // Renewal keeps it for several TTLs, and a quiet watch stays connected meanwhile.
    let quiet = tokio::time::timeout(
        ttl * 3,
        view.wait_for(|s| !s.decode.contains_key("d0") || !s.etcd_connected),
    )
    .await
    .map(|changed| changed.map(|snapshot| snapshot.clone()));
    assert!(
        quiet.is_err(),
        "d0 left or the watch dropped while renewing: {quiet:?}"
    );
    assert!(d0.is_registered());

    // A crash: renewal stops, nothing is revoked.
    let crashed = Instant::now();
    drop(d0);
    wait_view(&mut view, ttl + Duration::from_secs(3), "d0 lapsing", |s| {
        !s.decode.contains_key("d0")
    })
    .await;
    let gone_after = crashed.elapsed();
    assert!(
        gone_after >= Duration::from_secs(1),
        "d0 left after {gone_after:?}: it was revoked, not lapsed"
    );
    assert!(view.borrow().etcd_connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_and_registration_survive_etcd_restarts() {
    init_logs();
    let mut etcd = Etcd::start().await;
    let config = etcd.config(3);
    let decode = node("d0", NodeRole::Decode);
    let d0 = Registration::register(&config, &decode).await.unwrap();
    let membership = watch(&config).await.unwrap();
    let mut view = membership.subscribe();
    assert!(membership.current().decode.contains_key("d0"));

    // etcd down: the view keeps its nodes and says it is disconnected.
    etcd.kill();
    let stale = wait_view(&mut view, PROPAGATION, "a disconnected view", |s| {
        !s.etcd_connected
    })
    .await;
    assert_eq!(stale.decode.get("d0"), Some(&decode));
    wait_registered(&d0, false, PROPAGATION).await;

    // Back on the same data: the view lists again, the lease is renewed again.
    etcd.restart().await;
    let back = wait_view(&mut view, RECOVERY, "a reconnected view with d0", |s| {
        s.etcd_connected && s.decode.contains_key("d0")
    })
    .await;
    assert_eq!(back.decode.get("d0"), Some(&decode));
    wait_registered(&d0, true, RECOVERY).await;

    // Back with nothing (the lease is gone too): the node registers again under a new lease.
    etcd.restart_empty().await;
    wait_view(
        &mut view,
        RECOVERY,
        "d0 registered again after data loss",
        |s| s.etcd_connected && s.decode.get("d0") == Some(&decode),
    )
    .await;
    wait_registered(&d0, true, RECOVERY).await;

    // The new registration is a real one: deregistering still removes it at once.
    d0.deregister().await.unwrap();
    wait_view(&mut view, Duration::from_secs(2), "d0 leaving", |s| {
        !s.decode.contains_key("d0")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_the_prefix_is_ignored() {
    init_logs();
    let etcd = Etcd::start().await;
    let config = etcd.config(10);
    let mut client = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    let prefix = config.nodes_prefix();
    // Not protobuf; a NodeInfo under another node's key; an unknown role.
    let impostor = node("d9", NodeRole::Decode).encode_to_vec();
    let garbage: [(String, Vec<u8>); 3] = [
        (format!("{prefix}decode/junk"), b"\xff\xff\xff".to_vec()),
        (format!("{prefix}decode/d1"), impostor.clone()),
        (format!("{prefix}gpu/d9"), impostor),
    ];
    for (key, value) in &garbage[..2] {
        client.put(key.as_str(), value.clone(), None).await.unwrap();
    }

    // Found by the first list...
    let membership = watch(&config).await.unwrap();
    let mut view = membership.subscribe();
    assert!(membership.current().is_empty());
    assert!(membership.current().etcd_connected);

    // ...and by the watch: a valid node registered after the garbage shows it was read past.
    client
        .put(garbage[2].0.as_str(), garbage[2].1.clone(), None)
        .await
        .unwrap();
    client
        .put(format!("{prefix}prefill/junk"), b"\x0a".to_vec(), None)
        .await
        .unwrap();
    let decode = node("d0", NodeRole::Decode);
    let _d0 = Registration::register(&config, &decode).await.unwrap();
    let seen = wait_view(&mut view, PROPAGATION, "d0 after the garbage", |s| {
        s.decode.contains_key("d0")
    })
    .await;
    assert_eq!(seen.len(), 1, "only d0 is a valid node: {seen:?}");
    assert!(seen.etcd_connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_unreachable_etcd_are_errors() {
    init_logs();
    let unreachable = MembershipConfig {
        etcd_endpoints: vec![format!("http://127.0.0.1:{}", free_port())],
        lease_ttl_secs: 2,
        ..Default::default()
    };
    let started = Instant::now();
    let err = watch(&unreachable).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let err = Registration::register(&unreachable, &node("d0", NodeRole::Decode))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let no_role = node("x", NodeRole::Unspecified);
    assert!(matches!(
        Registration::register(&unreachable, &no_role).await,
        Err(MembershipError::InvalidNodeInfo(_))
    ));
    let no_endpoint = MembershipConfig {
        etcd_endpoints: vec![],
        ..Default::default()
    };
    let err = watch(&no_endpoint).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}
