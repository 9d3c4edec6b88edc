//! Admission control at the client edge, for both APIs: who may call (API keys), how much each
//! key may ask for, and how much the cluster lets wait.
//!
//! A request is admitted or refused at once, before any work: a key over its own limits gets
//! 429 (gRPC RESOURCE_EXHAUSTED), a full waiting queue 503 (gRPC UNAVAILABLE), both with
//! `Retry-After`. "Waiting" means admitted and without a first token yet: queued on a decode
//! node, being prefilled or its KV in flight. That queue is what a new request's time to first
//! token is made of, so bounding it (by requests and by their prompt tokens) bounds TTFT instead
//! of letting a burst queue for minutes. By default it holds as many requests as the decode
//! nodes can run at once twice over (the sum of their `--max-num-seqs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pd_common::error::Refusal;
use pd_common::telemetry::names;
use pd_common::{Error, Result};

/// By default the waiting queue holds this many times what the decode nodes run at once.
const QUEUED_BATCHES: usize = 2;

/// Flags of the client edge's access and admission control.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdmissionConfig {
    /// API keys clients must send, as `Authorization: Bearer <key>` over HTTP or the
    /// `authorization` metadata over gRPC (several: comma-separated). Without any key the APIs
    /// are open. /health and /live never ask for one.
    #[arg(long = "api-key", env = "PD_API_KEY", value_delimiter = ',')]
    pub api_keys: Vec<String>,

    /// A file of API keys, one per line (blank lines and `#` comments skipped), added to
    /// --api-key.
    #[arg(long, env = "PD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Ask for a key on /metrics and /debug/kv_index too (they are open by default, for
    /// scrapers and probes).
    #[arg(long, env = "PD_METRICS_REQUIRE_API_KEY")]
    pub metrics_require_api_key: bool,

    /// Most requests one API key may have open at once; more get 429. 0: no limit.
    #[arg(long, env = "PD_API_KEY_MAX_CONCURRENT_REQUESTS", default_value_t = 0)]
    pub api_key_max_concurrent_requests: usize,

    /// Most requests one API key may start per second, in bursts of up to one second's worth;
    /// more get 429. 0: no limit.
    #[arg(
        long,
        env = "PD_API_KEY_MAX_REQUESTS_PER_SECOND",
        default_value_t = 0.0
    )]
    pub api_key_max_requests_per_second: f64,

    /// Most requests (of all clients) admitted and still waiting for their first token; past
    /// it, new requests get 503 with Retry-After at once. Default: twice what the decode nodes
    /// run at once (their summed --max-num-seqs), so a full batch can queue behind the running
    /// one. -1: no limit.
    #[arg(long, env = "PD_MAX_WAITING_REQUESTS", allow_negative_numbers = true)]
    pub max_waiting_requests: Option<i64>,

    /// Most prompt tokens of the requests waiting for their first token; past it, 503 with
    /// Retry-After. 0: no limit.
    #[arg(long, env = "PD_MAX_WAITING_PROMPT_TOKENS", default_value_t = 0)]
    pub max_waiting_prompt_tokens: usize,
}

/// Who a request comes from: the index of its API key, or nobody when keys are off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller(Option<usize>);

/// The edge's gatekeeper: checks keys, keeps each key's limits and the cluster's waiting queue.
pub struct Admission {
    keys: Vec<String>,
    metrics_require_key: bool,
    key_concurrency: usize,
    key_rate: f64,
    /// `None`: the decode nodes' capacity; `Some(None)`: no limit.
    max_waiting: Option<Option<usize>>,
    max_waiting_tokens: usize,
    state: Mutex<State>,
    /// Recent time from arrival to first token in microseconds (an exponential average): how
    /// long a refused client should wait before it tries again.
    recent_wait_us: AtomicU64,
}

#[derive(Default)]
struct State {
    waiting: usize,
    waiting_tokens: usize,
    keys: HashMap<usize, KeyState>,
}

struct KeyState {
    open: usize,
    /// Token bucket of --api-key-max-requests-per-second.
    tokens: f64,
    refilled: Instant,
}

impl Admission {
    pub fn new(config: &AdmissionConfig) -> Result<Arc<Self>> {
        let mut keys: Vec<String> = config
            .api_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(path) = &config.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::invalid(format!(
                    "cannot read --api-key-file {}: {e}",
                    path.display()
                ))
            })?;
            keys.extend(parse_key_file(&text));
            if keys.is_empty() {
                return Err(Error::invalid(format!(
                    "--api-key-file {} holds no key",
                    path.display()
                )));
            }
        }
        let rate = config.api_key_max_requests_per_second;
        if !rate.is_finite() || rate < 0.0 {
            return Err(Error::invalid(format!(
                "--api-key-max-requests-per-second must be 0 or more, not {rate}"
            )));
        }
        let max_waiting = match config.max_waiting_requests {
            None => None,
            Some(n) if n < 0 => Some(None),
            Some(n) => Some(Some(n as usize)),
        };
        Ok(Arc::new(Self {
            keys,
            metrics_require_key: config.metrics_require_api_key,
            key_concurrency: config.api_key_max_concurrent_requests,
            key_rate: rate,
            max_waiting,
            max_waiting_tokens: config.max_waiting_prompt_tokens,
            state: Mutex::new(State::default()),
            recent_wait_us: AtomicU64::new(0),
        }))
    }

    pub fn keys_required(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn metrics_require_key(&self) -> bool {
        self.metrics_require_key && self.keys_required()
    }

    /// Who sent `authorization` (the header's or metadata's value), when keys are on. Compares
    /// in time independent of where a wrong key differs.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller> {
        if self.keys.is_empty() {
            return Ok(Caller(None));
        }
        let Some(value) = authorization else {
            return Err(Error::Unauthenticated(
                "an API key is required: send `Authorization: Bearer <key>`".into(),
            ));
        };
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value)
            .trim();
        let found = self.keys.iter().enumerate().fold(None, |found, (i, key)| {
            if constant_time_eq(key.as_bytes(), presented.as_bytes()) {
                Some(i)
            } else {
                found
            }
        });
        match found {
            Some(i) => Ok(Caller(Some(i))),
            None => Err(Error::Unauthenticated("the API key is not valid".into())),
        }
    }

    /// Admits one client request of `jobs` sequences and `prompt_tokens` prompt tokens in all,
    /// or refuses it at once. `capacity` is what the decode nodes run at once.
    pub fn admit(
        self: &Arc<Self>,
        caller: Caller,
        prompt_tokens: &[usize],
        capacity: usize,
    ) -> Result<Admitted> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(key) = caller.0 {
            let k = state.keys.entry(key).or_insert_with(|| KeyState {
                open: 0,
                tokens: self.key_rate.max(1.0),
                refilled: now,
            });
            if self.key_concurrency > 0 && k.open >= self.key_concurrency {
                return Err(Error::Refused {
                    refusal: Refusal::RateLimited,
                    message: format!(
                        "this API key already has {} requests open, its limit",
                        k.open
                    ),
                    retry_after: self.recent_wait(),
                });
            }
            if self.key_rate > 0.0 {
                let burst = self.key_rate.max(1.0);
                let elapsed = now.duration_since(k.refilled).as_secs_f64();
                k.tokens = (k.tokens + elapsed * self.key_rate).min(burst);
                k.refilled = now;
                if k.tokens < 1.0 {
                    let wait = (1.0 - k.tokens) / self.key_rate;
                    return Err(Error::Refused {
                        refusal: Refusal::RateLimited,
                        message: format!(
                            "this API key is over its limit of {} requests per second",
                            self.key_rate
                        ),
                        retry_after: Duration::from_secs_f64(wait),
                    });
                }
            }
        }
        let jobs = prompt_tokens.len();
        let tokens: usize = prompt_tokens.iter().sum();
        let max_waiting = match self.max_waiting {
            None => Some(QUEUED_BATCHES * capacity),
            Some(limit) => limit,
        };
        // A request alone in the queue is always admitted, however large: the limits bound a
        // queue, not a request.
        let over_requests = max_waiting.is_some_and(|m| state.waiting + jobs > m.max(1));
        let over_tokens = self.max_waiting_tokens > 0
            && state.waiting > 0
            && state.waiting_tokens + tokens > self.max_waiting_tokens;
        if over_requests || over_tokens {
            let message = if over_requests {
                format!(
                    "the cluster is overloaded: {} requests are waiting for a first token (limit {})",
                    state.waiting,
                    max_waiting.unwrap_or(0).max(1)
                )
            } else {
                format!(
                    "the cluster is overloaded: {} prompt tokens are waiting (limit {})",
                    state.waiting_tokens, self.max_waiting_tokens
                )
            };
            return Err(Error::Refused {
                refusal: Refusal::Overloaded,
                message,
                retry_after: self.recent_wait(),
            });
        }
        if let Some(key) = caller.0 {
            let k = state.keys.get_mut(&key).expect("inserted above");
            k.open += 1;
            if self.key_rate > 0.0 {
                k.tokens -= 1.0;
            }
        }
        state.waiting += jobs;
        state.waiting_tokens += tokens;
        metrics::gauge!(names::ROUTER_WAITING_REQUESTS).set(state.waiting as f64);
        drop(state);
        let request = Arc::new(RequestSlot {
            admission: self.clone(),
            key: caller.0,
        });
        Ok(Admitted {
            tickets: prompt_tokens
                .iter()
                .map(|&tokens| Ticket {
                    request: request.clone(),
                    waiting_tokens: Some(tokens),
                })
                .collect(),
        })
    }

    fn recent_wait(&self) -> Duration {
        Duration::from_micros(self.recent_wait_us.load(Ordering::Relaxed))
    }

    fn leave_queue(&self, tokens: usize, waited: Option<Duration>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.waiting -= 1;
        state.waiting_tokens -= tokens;
        metrics::gauge!(names::ROUTER_WAITING_REQUESTS).set(state.waiting as f64);
        drop(state);
        if let Some(waited) = waited {
            let sample = waited.as_micros().min(u64::MAX as u128) as u64;
            let old = self.recent_wait_us.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                (old * 7 + sample) / 8
            };
            self.recent_wait_us.store(new, Ordering::Relaxed);
        }
    }

    /// Requests waiting for a first token and their prompt tokens (for tests and metrics).
    pub fn waiting(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.waiting, state.waiting_tokens)
    }
}

/// An admitted request: one ticket per sequence it runs.
pub struct Admitted {
    pub tickets: Vec<Ticket>,
}

/// Counts a request against its key's open requests until its last sequence ends.
struct RequestSlot {
    admission: Arc<Admission>,
    key: Option<usize>,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut state = self
                .admission
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(k) = state.keys.get_mut(&key) {
                k.open -= 1;
            }
        }
    }
}

/// One admitted sequence: in the waiting queue until its first token (or its end).
pub struct Ticket {
    request: Arc<RequestSlot>,
    /// Its prompt tokens while it waits; `None` once it has left the queue.
    waiting_tokens: Option<usize>,
}

impl Ticket {
    /// The first token arrived `waited` after the request did: it leaves the queue.
    pub fn first_token(&mut self, waited: Duration) {
        if let Some(tokens) = self.waiting_tokens.take() {
            self.request.admission.leave_queue(tokens, Some(waited));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(tokens) = self.waiting_tokens.take() {
            self.request.admission.leave_queue(tokens, None);
        }
    }
}

fn parse_key_file(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(config: AdmissionConfig) -> Arc<Admission> {
        Admission::new(&config).expect("valid config")
    }

    fn refusal(e: Error) -> (Refusal, Duration) {
        match e {
            Error::Refused {
                refusal,
                retry_after,
                ..
            } => (refusal, retry_after),
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn keys_are_checked_only_when_configured() {
        let open = admission(AdmissionConfig::default());
        assert_eq!(open.authenticate(None).unwrap(), Caller(None));
        let keyed = admission(AdmissionConfig {
            api_keys: vec!["k1".into(), " k2 ".into(), "".into()],
            ..Default::default()
        });
        assert!(matches!(
            keyed.authenticate(None),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            keyed.authenticate(Some("Bearer k3")),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            keyed.authenticate(Some("Bearer k")),
            Err(Error::Unauthenticated(_))
        ));
        assert_eq!(
            keyed.authenticate(Some("Bearer k1")).unwrap(),
            Caller(Some(0))
        );
        assert_eq!(keyed.authenticate(Some("k2")).unwrap(), Caller(Some(1)));
    }

    #[test]
    fn a_key_file_adds_keys_and_skips_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# ops\nalpha\n\n  beta  \n").unwrap();
        let a = admission(AdmissionConfig {
            api_key_file: Some(path.clone()),
            ..Default::default()
        });
        assert_eq!(
            a.authenticate(Some("Bearer beta")).unwrap(),
            Caller(Some(1))
        );
        assert!(a.authenticate(Some("Bearer # ops")).is_err());
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(Admission::new(&AdmissionConfig {
            api_key_file: Some(path),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn the_waiting_queue_is_bounded_by_capacity_and_first_tokens_free_it() {
        let a = admission(AdmissionConfig::default());
        let caller = Caller(None);
        // Capacity 2: up to 4 may wait.
        let mut first = a.admit(caller, &[10, 10], 2).unwrap();
        let _second = a.admit(caller, &[10, 10], 2).unwrap();
        assert_eq!(a.waiting(), (4, 40));
        let (kind, _) = refusal(a.admit(caller, &[10], 2).err().unwrap());
        assert_eq!(kind, Refusal::Overloaded);
        first.tickets[0].first_token(Duration::from_millis(1_500));
        assert_eq!(a.waiting(), (3, 30));
        let third = a.admit(caller, &[10], 2).unwrap();
        // A refusal now says to come back after about the recent wait.
        let (_, after) = refusal(a.admit(caller, &[10], 2).err().unwrap());
        assert_eq!(after, Duration::from_millis(1_500));
        drop(first);
        drop(third);
        assert_eq!(a.waiting(), (2, 20));
    }

    #[test]
    fn queued_prompt_tokens_are_bounded_but_a_lone_request_passes() {
        let a = admission(AdmissionConfig {
            max_waiting_requests: Some(-1),
            max_waiting_prompt_tokens: 100,
            ..Default::default()
        });
        let big = a.admit(Caller(None), &[500], 0).unwrap();
        assert!(a.admit(Caller(None), &[1], 0).is_err());
        drop(big);
        let _a = a.admit(Caller(None), &[60], 0).unwrap();
        let _b = a.admit(Caller(None), &[40], 0).unwrap();
        assert!(a.admit(Caller(None), &[1], 0).is_err());
    }

    #[test]
    fn each_key_has_its_own_concurrency_limit() {
        let a = admission(AdmissionConfig {
            api_keys: vec!["a".into(), "b".into()],
            api_key_max_concurrent_requests: 1,
            max_waiting_requests: Some(-1),
            ..Default::default()
        });
        let key_a = a.authenticate(Some("Bearer a")).unwrap();
        let key_b = a.authenticate(Some("Bearer b")).unwrap();
        let mut open = a.admit(key_a, &[5, 5], 0).unwrap();
        let (kind, _) = refusal(a.admit(key_a, &[5], 0).err().unwrap());
        assert_eq!(kind, Refusal::RateLimited);
        let _other = a.admit(key_b, &[5], 0).unwrap();
        // The request stays open until its last sequence ends.
        drop(open.tickets.pop());
        assert!(a.admit(key_a, &[5], 0).is_err());
        drop(open);
        a.admit(key_a, &[5], 0).unwrap();
    }

    #[test]
    fn each_key_has_a_request_rate() {
        let a = admission(AdmissionConfig {
            api_keys: vec!["a".into()],
            api_key_max_requests_per_second: 2.0,
            max_waiting_requests: Some(-1),
            ..Default::default()
        });
        let key = a.authenticate(Some("Bearer a")).unwrap();
        // A burst of one second's worth, then the bucket is empty.
        a.admit(key, &[1], 0).unwrap();
        a.admit(key, &[1], 0).unwrap();
        let (kind, after) = refusal(a.admit(key, &[1], 0).err().unwrap());
        assert_eq!(kind, Refusal::RateLimited);
        assert!(
            after > Duration::ZERO && after <= Duration::from_millis(500),
            "{after:?}"
        );
        assert!(Admission::new(&AdmissionConfig {
            api_key_max_requests_per_second: f64::NAN,
            ..Default::default()
        })
        .is_err());
    }
}
