//! The systems under test, each started fresh as its own process in front of
//! the same mock upstream: the mock itself (the floor), nginx `proxy_pass`,
//! sluice in three set-ups, and the LiteLLM proxy.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Straight to the mock (the floor).
    Direct,
    /// nginx `proxy_pass` with upstream keep-alive.
    Nginx,
    /// A bare hyper reverse proxy on sluice's stack (see
    /// [`crate::load::passthrough`]): what the stack costs without sluice's
    /// work.
    HyperProxy,
    /// sluice, every request recorded with its bodies, no policies.
    Sluice,
    /// sluice with the default PII (redact) and secrets (block) principles
    /// on inputs and outputs.
    SluicePolicies,
    /// sluice with policies during an active 5 % rollout.
    SluiceRollout,
    /// sluice with policies during a rollout whose one stage sends everyone
    /// to the candidate, with the admin API on its own listener (what
    /// `sluice-load rollback` rolls back under load).
    SluiceRollback,
    /// The LiteLLM proxy.
    Litellm,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 8] = [
        Scenario::Direct,
        Scenario::Nginx,
        Scenario::HyperProxy,
        Scenario::Sluice,
        Scenario::SluicePolicies,
        Scenario::SluiceRollout,
        Scenario::SluiceRollback,
        Scenario::Litellm,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Nginx => "nginx",
            Scenario::HyperProxy => "hyper-proxy",
            Scenario::Sluice => "sluice",
            Scenario::SluicePolicies => "sluice-policies",
            Scenario::SluiceRollout => "sluice-rollout",
            Scenario::SluiceRollback => "sluice-rollback",
            Scenario::Litellm => "litellm",
        }
    }

    /// Whether it is sluice (rows are counted).
    pub fn is_sluice(self) -> bool {
        matches!(
            self,
            Scenario::Sluice
                | Scenario::SluicePolicies
                | Scenario::SluiceRollout
                | Scenario::SluiceRollback
        )
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scenario {s:?} (known: {})",
                    Scenario::ALL.map(Scenario::name).join(", ")
                )
            })
    }
}

/// Where the programs under test are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The sluice binary (a release build).
    pub sluice: PathBuf,
    /// nginx.
    pub nginx: PathBuf,
    /// The `litellm` command.
    pub litellm: PathBuf,
    /// CPUs the system under test may run on (`taskset -c` list), if pinned.
    pub target_cpus: Option<String>,
    /// Where sluice targets write their logs, if kept.
    pub logs: Option<PathBuf>,
    /// sluice's `workers` setting.
    pub sluice_workers: usize,
    /// sluice's `max_connections` setting (0: no cap).
    pub sluice_max_connections: usize,
}

/// A command for `program`, under `taskset -c CPUS` when pinned.
fn command(program: &Path, cpus: &Option<String>) -> Command {
    match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The API key the sluice targets accept.
pub const KEY: &str = "sk-load";
/// The operator token the sluice targets accept on their admin API.
pub const OPS: &str = "ops-load";

/// A started target.
pub struct Running {
    /// What it is.
    pub scenario: Scenario,
    /// Chat completions URL.
    pub url: String,
    /// Bearer token to send.
    pub bearer: Option<String>,
    /// The process (not for `direct`: the mock is shared).
    pub child: Option<Child>,
    /// sluice's store.
    pub db: Option<PathBuf>,
    /// Where to keep a copy of the store after the stop (with `--logs`).
    keep_db: Option<PathBuf>,
    /// sluice's separate admin listener, when the scenario has one.
    pub admin_port: Option<u16>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// A target that is one process and keeps no store (nginx, the bare
    /// proxy, LiteLLM).
    fn process(
        scenario: Scenario,
        url: String,
        bearer: Option<String>,
        child: Child,
        dir: tempfile::TempDir,
    ) -> Running {
        Running {
            scenario,
            url,
            bearer,
            child: Some(child),
            db: None,
            keep_db: None,
            admin_port: None,
            _dir: dir,
        }
    }

    /// Process id, if the target is its own process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// sluice: its own overhead histogram (`sluice_gateway_overhead_seconds`)
    /// read from `/metrics`, as the bucket bounds holding p50, p99 and
    /// p99.9, in microseconds.
    pub fn overhead_us(&self) -> Option<[u64; 3]> {
        let text = self.metrics()?;
        let mut buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("sluice_gateway_overhead_seconds_bucket{le=\""))
            .filter_map(|rest| {
                let (le, n) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, n.trim().parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let at = |q: f64| {
            buckets
                .iter()
                .find(|(_, n)| *n >= q * total)
                .map_or(u64::MAX, |(le, _)| {
                    if le.is_finite() {
                        (le * 1e6).round() as u64
                    } else {
                        u64::MAX
                    }
                })
        };
        Some([at(0.5), at(0.99), at(0.999)])
    }

    /// sluice: requests whose handler ran on another serving thread than
    /// its connection's (`sluice_requests_offloaded_total`; always 0 on the
    /// shared runtime).
    pub fn offloaded(&self) -> Option<u64> {
        self.metrics()?
            .lines()
            .find_map(|l| l.strip_prefix("sluice_requests_offloaded_total "))?
            .trim()
            .parse()
            .ok()
    }

    /// sluice: its `/metrics` text.
    fn metrics(&self) -> Option<String> {
        if !self.scenario.is_sluice() {
            return None;
        }
        let port: u16 = self
            .url
            .trim_start_matches("http://127.0.0.1:")
            .split('/')
            .next()?
            .parse()
            .ok()?;
        http_get(port, "/metrics").ok()
    }

    /// Stops it gracefully (SIGTERM, then SIGKILL after 30 s); returns the
    /// recorded row count for sluice.
    pub fn stop(mut self) -> Result<Option<u64>, String> {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let t = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let (Some(db), Some(keep)) = (&self.db, &self.keep_db) {
            // The store and its write-ahead log, for reading the records.
            for suffix in ["", "-wal", "-shm"] {
                let from = PathBuf::from(format!("{}{suffix}", db.display()));
                if from.exists() {
                    let to = PathBuf::from(format!("{}{suffix}", keep.display()));
                    std::fs::copy(&from, &to)
                        .map_err(|e| format!("cannot keep {}: {e}", from.display()))?;
                }
            }
        }
        match &self.db {
            Some(db) => {
                let store = sluice_store::Store::open_existing(&db.to_string_lossy())
                    .map_err(|e| e.to_string())?;
                Ok(Some(store.count().map_err(|e| e.to_string())?))
            }
            None => Ok(None),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_port(port: u16, within: Duration) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < within {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listened on port {port} within {within:?}"))
}

/// Starts a scenario in front of the mock at `mock`.
pub fn start(scenario: Scenario, mock: SocketAddr, p: &Programs) -> Result<Running, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    match scenario {
        Scenario::Direct => Ok(Running {
            scenario,
            url: format!("http://{mock}/v1/chat/completions"),
            bearer: None,
            child: None,
            db: None,
            keep_db: None,
            admin_port: None,
            _dir: dir,
        }),
        Scenario::Nginx => {
            let conf = dir.path().join("nginx.conf");
            let d = dir.path().display();
            std::fs::write(
                &conf,
                format!(
                    "worker_processes auto;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
                     events {{ worker_connections 20000; }}\n\
                     http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                       fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                       keepalive_requests 1000000;\n\
                       upstream mock {{ server {mock}; keepalive 1024; }}\n\
                       server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    location / {{\n      proxy_pass http://mock;\n\
                             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let child = command(&p.nginx, &p.target_cpus)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(dir.path())
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start nginx ({}): {e}", p.nginx.display()))?;
            wait_port(port, Duration::from_secs(10))?;
            Ok(Running::process(scenario, url, None, child, dir))
        }
        Scenario::HyperProxy => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot locate sluice-load for the proxy: {e}"))?;
            let child = command(&exe, &p.target_cpus)
                .args(["passthrough", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--upstream", &mock.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start the bare proxy: {e}"))?;
            wait_port(port, Duration::from_secs(10))?;
            Ok(Running::process(scenario, url, None, child, dir))
        }
        Scenario::Sluice
        | Scenario::SluicePolicies
        | Scenario::SluiceRollout
        | Scenario::SluiceRollback => {
            let db = dir.path().join("load.db");
            let cfg = dir.path().join("sluice.toml");
            // max_connections only when set, so binaries from before the
            // setting still run (for A/B comparisons).
            let cap = match p.sluice_max_connections {
                0 => String::new(),
                n => format!("max_connections = {n}\n"),
            };
            let admin_port = match scenario {
                Scenario::SluiceRollback => Some(free_port()?),
                _ => None,
            };
            let admin = match admin_port {
                Some(a) => format!("admin_listen = \"127.0.0.1:{a}\"\n"),
                None => String::new(),
            };
            let text = sluice_config(scenario, port, mock, &db).replacen(
                "\n",
                &format!("\nworkers = {}\n{cap}{admin}", p.sluice_workers),
                1,
            );
            std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
            let (level, stderr) = match &p.logs {
                Some(d) => {
                    let path = d.join(format!("{}-{port}.log", scenario.name()));
                    let f = std::fs::File::create(&path)
                        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                    ("info", Stdio::from(f))
                }
                None => ("warn", Stdio::null()),
            };
            let mut child = command(&p.sluice, &p.target_cpus)
                .args(["serve", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", level)
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .map_err(|e| format!("cannot start sluice ({}): {e}", p.sluice.display()))?;
            let out = child.stdout.take().ok_or("no stdout")?;
            let mut lines = BufReader::new(out).lines();
            let first = lines
                .next()
                .and_then(Result::ok)
                .ok_or("sluice printed nothing")?;
            if !first.starts_with("sluice listening on") {
                return Err(format!("sluice did not start: {first}"));
            }
            std::thread::spawn(move || for _ in lines {});
            if matches!(scenario, Scenario::SluiceRollout | Scenario::SluiceRollback) {
                start_rollout(admin_port.unwrap_or(port))?;
            }
            Ok(Running {
                scenario,
                url,
                bearer: Some(KEY.to_string()),
                child: Some(child),
                db: Some(db),
                keep_db: p
                    .logs
                    .as_ref()
                    .map(|d| d.join(format!("{}-{port}.db", scenario.name()))),
                admin_port,
                _dir: dir,
            })
        }
        Scenario::Litellm => {
            let cfg = dir.path().join("litellm.yaml");
            std::fs::write(
                &cfg,
                format!(
                    "model_list:\n  - model_name: support\n    litellm_params:\n      model: openai/mock-1\n      \
                     api_base: http://{mock}/v1\n      api_key: sk-mock\nlitellm_settings:\n  drop_params: true\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let child = command(&p.litellm, &p.target_cpus)
                .arg("--config")
                .arg(&cfg)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                // Its cost map is bundled; do not reach for the network.
                .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                .env("LITELLM_LOG", "ERROR")
                .env("LITELLM_TELEMETRY", "False")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start litellm ({}): {e}", p.litellm.display()))?;
            wait_port(port, Duration::from_secs(120))?;
            let bearer = Some("sk-anything".to_string());
            Ok(Running::process(scenario, url, bearer, child, dir))
        }
    }
}

fn http_get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Starts the `support-v2` rollout through the admin API on `port`.
pub fn start_rollout(port: u16) -> Result<(), String> {
    use std::io::{Read, Write};
    let body = r#"{"reason":"load test"}"#;
    let req = format!(
        "POST /admin/rollouts/support-v2/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPS}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("starting the rollout failed: {out}"))
    }
}

/// sluice's configuration for a scenario.
pub fn sluice_config(scenario: Scenario, port: u16, mock: SocketAddr, db: &Path) -> String {
    let policies = scenario != Scenario::Sluice;
    let mut s = format!(
        r#"listen = "127.0.0.1:{port}"
max_in_flight = 50000

[store]
path = "{db}"
log_bodies = "full"

[[api_keys]]
name = "load"
sha256 = "{key}"

[[admin_tokens]]
name = "ops"
role = "operator"
sha256 = "{ops}"

[providers.mock]
kind = "openai"
base_url = "http://{mock}/v1"
timeout = "30s"

[deployments.support]
stable = "v1"
principles = {principles}
variants.v1 = {{ provider = "mock", model = "mock-1" }}
variants.v2 = {{ provider = "mock", model = "mock-2" }}
"#,
        db = db.display(),
        key = sluice_core::secret::digest_hex(KEY),
        ops = sluice_core::secret::digest_hex(OPS),
        principles = if policies {
            r#"["no-pii-leak", "no-secrets"]"#
        } else {
            "[]"
        },
    );
    if policies {
        s.push_str(
            r#"
[principles.no-pii-leak]
applies_to = ["output"]
action = "redact"
detectors = [{ kind = "pii" }]

[principles.no-secrets]
applies_to = ["input", "output"]
action = "block"
detectors = [{ kind = "secrets" }]
"#,
        );
    }
    let stages = match scenario {
        Scenario::SluiceRollout => {
            Some(r#"[{ kind = "percent", percent = 5 }, { kind = "percent", percent = 100 }]"#)
        }
        Scenario::SluiceRollback => Some(r#"[{ kind = "percent", percent = 100 }]"#),
        _ => None,
    };
    if let Some(stages) = stages {
        s.push_str(&format!(
            "\n[rollouts.support-v2]\ndeployment = \"support\"\ncandidate = \"v2\"\nstages = {stages}\n"
        ));
    }
    s
}
