//! `pd-bench plan`: the layout that serves a workload within its SLOs on the fewest devices.
//!
//! A large cluster is planned as copies of one unit (P prefill and D decode nodes, one device
//! each, or one aggregated node): the router spreads requests evenly, so a unit serves its
//! share of the arrival rate as it would alone. For every unit of up to `--max-unit` nodes the
//! planner finds, by bisection over simulated runs, the highest rate at which at least
//! `--slo-attainment` of requests meet every SLO, and ranks units by that rate per device.
//! Then it sizes the cluster: as many units as fit in `--gpus` devices, and the rate they
//! carry; or, with `--request-rate`, the devices that rate needs.
//!
//! A simulated run is finite: past a unit's capacity its queues grow for as long as requests
//! keep coming, and a short run ends before they hurt most requests. So a rate counts as
//! within SLO only if the last quarter of the requests meets the SLO share too, and
//! `--num-prompts` should span many request lifetimes; and it counts only if no kind of node is
//! loaded past its capacity by the profile's own figures (a queue that grows forever).

use std::path::PathBuf;

use serde_json::{json, Value};

use super::des::{self, Layout};
use super::profile::Profile;
use super::{at_rate, layout_name, lengths};
use crate::bench::plot::{self, Chart, Series};
use crate::bench::serve::client::RequestOutput;
use crate::bench::serve::metrics::{self, Goodput};
use crate::bench::serve::ServeArgs;

#[derive(clap::Args, Clone, Debug)]
pub struct PlanArgs {
    /// The device profile (`pd-bench profile --from-gpu-results ...` for a GPU).
    #[arg(long)]
    pub profile: PathBuf,

    /// Devices available.
    #[arg(long, default_value_t = 1000)]
    pub gpus: usize,

    /// Largest unit searched (prefill + decode nodes).
    #[arg(long, default_value_t = 8)]
    pub max_unit: usize,

    /// Share of requests that must meet every SLO.
    #[arg(long, default_value_t = 0.9)]
    pub slo_attainment: f64,

    /// KV backend between prefill and decode nodes.
    #[arg(long, default_value = "nccl")]
    pub kv_transfer: String,

    /// Where the plan (JSON) and its charts go.
    #[arg(long = "plan-dir", default_value = "plan-results")]
    pub dir: PathBuf,

    /// The workload (lengths, --num-prompts per simulated run, --burstiness, --goodput SLOs;
    /// --request-rate: the cluster's total rate to size for, or `inf` to fill --gpus).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What one unit sustains.
#[derive(Debug, Clone)]
pub struct UnitCapacity {
    pub layout: Layout,
    /// Highest rate (req/s) within the SLOs.
    pub rate: f64,
    /// Simulated (rate, share of requests within SLO) points of the search.
    pub curve: Vec<(f64, f64)>,
}

impl UnitCapacity {
    pub fn devices(&self) -> usize {
        self.layout.prefill + self.layout.decode
    }
    pub fn rate_per_device(&self) -> f64 {
        self.rate / self.devices() as f64
    }
}

/// What every simulated run of a plan shares: the workload, the device, the SLOs.
pub struct Search<'a> {
    pub lengths: &'a [(usize, usize)],
    pub profile: &'a Profile,
    pub backend: &'a str,
    pub args: &'a ServeArgs,
    pub slo: &'a Goodput,
}

impl Search<'_> {
    /// The busiest kind of node's utilization at `rate`, from the profile alone: prefill
    /// node-seconds per request (its prompt in chunks of the token budget), decode node-seconds
    /// per output token at a full batch of average context. Above 1 the queues grow without
    /// bound however well a finite run looks.
    fn utilization(&self, layout: Layout, rate: f64) -> f64 {
        let p = self.profile;
        let n = self.lengths.len().max(1) as f64;
        let mean_prompt = self.lengths.iter().map(|l| l.0 as f64).sum::<f64>() / n;
        let mean_output = self.lengths.iter().map(|l| l.1 as f64).sum::<f64>() / n;
        let budget = p.max_batch_tokens.max(1);
        let prompt = mean_prompt.round() as usize;
        let chunks: Vec<(usize, usize)> = (0..prompt)
            .step_by(budget)
            .map(|s| (s, budget.min(prompt - s)))
            .collect();
        let prefill_s =
            chunks.len() as f64 * p.step_overhead(true, false) + p.prefill_work(&chunks);
        let batch = p.max_num_seqs.max(1);
        let ctx = batch as f64 * (mean_prompt + mean_output / 2.0);
        let decode_s =
            (p.step_overhead(false, true) + p.decode_work(batch, ctx as usize)) / batch as f64;
        let (prefill_load, decode_load) = (rate * prefill_s, rate * mean_output * decode_s);
        if layout.prefill == 0 {
            (prefill_load + decode_load) / layout.decode as f64
        } else {
            (prefill_load / layout.prefill as f64).max(decode_load / layout.decode as f64)
        }
    }

    /// The share of a simulated run's requests that completed within every SLO.
    fn attainment(&self, layout: Layout, rate: f64) -> anyhow::Result<f64> {
        let requests = at_rate(self.lengths, rate, self.args)?;
        let link = if layout.prefill > 0 {
            Some(self.profile.link(self.backend)?)
        } else {
            None
        };
        let outputs = des::simulate(self.profile, layout, link, &requests, None)?;
        let slo = self.slo;
        let within_slo = |o: &RequestOutput| {
            let n = o.output_tokens.unwrap_or(0);
            o.success && slo.admits(o.ttft, metrics::tpot(o, n), o.latency)
        };
        let share = |os: &[&RequestOutput]| {
            os.iter().filter(|o| within_slo(o)).count() as f64 / os.len().max(1) as f64
        };
        // A rate the unit cannot sustain shows as queues that grow: the last requests sent
        // fare worse than the first. The run's share is the lower of all of them and its last
        // quarter, so a short run cannot hide an overload in its tail.
        let mut by_send: Vec<&RequestOutput> = outputs.iter().collect();
        by_send.sort_by(|a, b| a.start_time.total_cmp(&b.start_time));
        let tail = &by_send[by_send.len() * 3 / 4..];
        Ok(share(&by_send).min(share(tail)))
    }
}

/// The highest rate a unit sustains with `target` of its requests within the SLOs, by
/// doubling then bisection.
pub fn capacity(search: &Search, layout: Layout, target: f64) -> anyhow::Result<UnitCapacity> {
    let mut curve = Vec::new();
    let mut probe = |rate: f64| -> anyhow::Result<bool> {
        let a = search.attainment(layout, rate)?;
        curve.push((rate, a));
        Ok(a >= target && search.utilization(layout, rate) <= 1.0)
    };
    let (mut lo, mut hi) = (0.0, 0.25);
    while probe(hi)? {
        lo = hi;
        hi *= 2.0;
        if hi > 1e6 {
            break;
        }
    }
    for _ in 0..10 {
        let mid = 0.5 * (lo + hi);
        if probe(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(UnitCapacity {
        layout,
        rate: lo,
        curve,
    })
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let profile = Profile::read(&args.profile)?;
    let slo = Goodput::parse(&args.serve.goodput)?.ok_or_else(|| {
        anyhow::anyhow!("give the SLOs with --goodput, e.g. --goodput ttft:500 tpot:50")
    })?;
    let mut units = vec![Layout {
        prefill: 0,
        decode: 1,
        nodes_per_host: 1,
    }];
    anyhow::ensure!(args.gpus > 0, "--gpus must be at least 1");
    // A unit larger than the cluster cannot be built.
    let max_unit = args.max_unit.min(args.gpus);
    for p in 1..max_unit {
        for d in 1..=(max_unit - p) {
            units.push(Layout {
                prefill: p,
                decode: d,
                nodes_per_host: 1,
            });
        }
    }
    println!(
        "planning for {} x {} ({}), {} SLOs {:?} met by {:.0}% of requests",
        args.gpus,
        profile.device,
        profile.model,
        args.serve.dataset.dataset_name,
        args.serve.goodput,
        100.0 * args.slo_attainment
    );
    let lengths = lengths(&args.serve)?;
    let search = Search {
        lengths: &lengths,
        profile: &profile,
        backend: &args.kv_transfer,
        args: &args.serve,
        slo: &slo,
    };
    let mut caps = Vec::new();
    for layout in units {
        caps.push(capacity(&search, layout, args.slo_attainment)?);
    }
    caps.sort_by(|a, b| b.rate_per_device().total_cmp(&a.rate_per_device()));
    println!(
        "{:<11} {:>8} {:>14} {:>16}",
        "unit", "devices", "req/s in SLO", "req/s per device"
    );
    for c in &caps {
        println!(
            "{:<11} {:>8} {:>14.2} {:>16.3}",
            layout_name(&c.layout),
            c.devices(),
            c.rate,
            c.rate_per_device()
        );
    }
    let best = caps
        .first()
        .ok_or_else(|| anyhow::anyhow!("no unit fits"))?;
    anyhow::ensure!(
        best.rate > 0.0,
        "no layout meets the SLOs at any rate: loosen --goodput"
    );
    let aggregated = caps.iter().find(|c| c.layout.prefill == 0);
    let (units_n, total_rate) = if args.serve.request_rate.is_finite() {
        let n = (args.serve.request_rate / best.rate).ceil() as usize;
        anyhow::ensure!(
            n * best.devices() <= args.gpus,
            "{} req/s needs {} devices of the best layout, more than --gpus {}",
            args.serve.request_rate,
            n * best.devices(),
            args.gpus
        );
        (n, args.serve.request_rate)
    } else {
        let n = args.gpus / best.devices();
        (n, n as f64 * best.rate)
    };
    let devices = units_n * best.devices();
    println!(
        "\nrecommendation: {} units of {} ({} prefill + {} decode GPUs of {}), {} GPUs in all, {:.1} req/s within the SLOs ({:.3} per GPU{})",
        units_n,
        layout_name(&best.layout),
        units_n * best.layout.prefill,
        units_n * best.layout.decode,
        args.gpus,
        devices,
        total_rate,
        best.rate_per_device(),
        aggregated.filter(|a| a.layout != best.layout).map_or(String::new(), |a| format!(
            "; aggregated nodes would carry {:.3} per GPU, {:.2}x less",
            a.rate_per_device(),
            best.rate_per_device() / a.rate_per_device().max(f64::MIN_POSITIVE)
        ))
    );
    std::fs::create_dir_all(&args.dir)?;
    let plan = json!({
        "profile": profile.device, "model": profile.model, "gpus": args.gpus,
        "slo": args.serve.goodput, "slo_attainment": args.slo_attainment,
        "recommendation": {"unit": layout_name(&best.layout), "units": units_n, "prefill_gpus": units_n * best.layout.prefill,
            "decode_gpus": units_n * best.layout.decode, "gpus": devices, "request_rate": total_rate,
            "request_rate_per_gpu": best.rate_per_device()},
        "units": caps.iter().map(|c| json!({"unit": layout_name(&c.layout), "devices": c.devices(),
            "request_rate": c.rate, "request_rate_per_device": c.rate_per_device(),
            "curve": c.curve})).collect::<Vec<Value>>(),
    });
    std::fs::write(
        args.dir.join("plan.json"),
        serde_json::to_string_pretty(&plan)?,
    )?;
    let top: Vec<&UnitCapacity> = caps
        .iter()
        .take(5)
        .chain(aggregated.filter(|a| !caps.iter().take(5).any(|c| c.layout == a.layout)))
        .collect();
    plot::write(
        &Chart {
            title: "Requests within SLO, per unit, against the unit's request rate",
            x_label: "request rate per GPU (req/s)",
            y_label: "share of requests within SLO",
            series: top
                .iter()
                .map(|c| Series {
                    name: layout_name(&c.layout),
                    points: c
                        .curve
                        .iter()
                        .map(|&(r, a)| (r / c.devices() as f64, a))
                        .collect(),
                })
                .collect(),
        },
        &args.dir.join("attainment"),
    )?;
    plot::write(
        &Chart {
            title: "Goodput per GPU by unit (ranked)",
            x_label: "rank",
            y_label: "req/s within SLO per GPU",
            series: vec![Series {
                name: "units, best first".into(),
                points: caps
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i as f64 + 1.0, c.rate_per_device()))
                    .collect(),
            }],
        },
        &args.dir.join("per_gpu"),
    )?;
    println!("plan and charts written to {}", args.dir.display());
    Ok(())
}
