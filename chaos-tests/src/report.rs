//! The run report: `report.json`, a readable `summary.md` table, and `timeline.png` (throughput
//! and latency over time, fault windows shaded).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::linearizability::KeyedVerdict;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("plot: {0}")]
    Plot(String),
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultWindow {
    pub fault: String,
    pub targets: Vec<u64>,
    /// Seconds since the start of the run.
    pub start_s: f64,
    pub heal_s: f64,
    /// What recovery is measured from: "injection" (a majority kept running; measured from
    /// the end of the injection, which for member changes and bulk writes takes a while) or
    /// "heal".
    pub recovery_from: String,
    /// Time from that point to the first acknowledged write after it.
    pub recovery_ms: Option<u64>,
    pub within_bound: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the injection observed (e.g. whether a kill landed during a snapshot install).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One line of the summary table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    pub phase: String,
    pub start_s: f64,
    pub end_s: f64,
    pub operations: usize,
    pub acknowledged: usize,
    pub indeterminate: usize,
    pub lost: usize,
    pub anomalies: usize,
    pub recovery_ms: Option<u64>,
}

/// An acknowledged write missing from the final state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LostWrite {
    pub key: String,
    pub value: String,
    pub acknowledged_at_s: f64,
    pub server: u64,
    /// What the final state held instead.
    pub found: Option<String>,
}

/// Join tokens: each consumed at most once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenCheck {
    pub tokens_raced: usize,
    pub attested: usize,
    /// Tokens with two successful attestations.
    pub double_attested: Vec<u64>,
    /// Tokens whose creation was acknowledged and every attestation definitely refused.
    pub never_consumed: Vec<u64>,
}

/// Every server holds the same entries at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Convergence {
    pub identical: bool,
    /// Entries per node that answered.
    pub entries_per_node: BTreeMap<u64, usize>,
    /// Nodes that did not answer the final read.
    pub unreachable: Vec<u64>,
}

/// Workloads beside agents (when the run has agents).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkloadCheck {
    pub agents: usize,
    /// Workload API looks (SVID fetch + bundle).
    pub looks: usize,
    /// Failed SVID fetches after the workload first had one.
    pub errors: usize,
    pub first_errors: Vec<String>,
    pub sequences_seen: usize,
    pub sequence_regressions: Vec<String>,
}

/// All checks of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checks {
    pub linearizability: KeyedVerdict,
    pub lost_writes: Vec<LostWrite>,
    pub tokens: TokenCheck,
    pub convergence: Convergence,
    pub recovery_bound_ms: u64,
    pub recovery_within_bound: bool,
    #[serde(default)]
    pub workloads: WorkloadCheck,
    /// Empty when every check passed.
    pub failures: Vec<String>,
}

impl Checks {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bucket {
    pub t_s: f64,
    pub started: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub mean_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    pub nodes: u64,
    pub clients: usize,
    pub duration_s: f64,
    pub windows: Vec<FaultWindow>,
    pub rows: Vec<Row>,
    pub total: Row,
    pub checks: Checks,
    pub series: Vec<Bucket>,
    pub notes: Vec<String>,
    /// Every server process the run started (all gone when the run returns).
    pub processes: Vec<SpawnedProcess>,
    /// Docker mode: the name prefix of every container and network the run created (all
    /// removed when the run returns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_prefix: Option<String>,
}

/// A process the harness started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnedProcess {
    pub pid: u32,
    /// The config file it ran with (unique to the run).
    pub config: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.passed()
    }

    /// The readable summary (Markdown).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# plinth chaos run ({} mode, {} servers, {} clients, {:.0} s)\n\n",
            self.mode, self.nodes, self.clients, self.duration_s
        ));
        s.push_str("| fault | window (s) | operations | acknowledged | indeterminate | lost | anomalies | recovery |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
        for r in self.rows.iter().chain(std::iter::once(&self.total)) {
            let rec = r
                .recovery_ms
                .map_or_else(|| "-".to_string(), |ms| format!("{ms} ms"));
            s.push_str(&format!(
                "| {} | {:.1}-{:.1} | {} | {} | {} | {} | {} | {} |\n",
                r.phase,
                r.start_s,
                r.end_s,
                r.operations,
                r.acknowledged,
                r.indeterminate,
                r.lost,
                r.anomalies,
                rec
            ));
        }
        let c = &self.checks;
        s.push_str("\n## Checks\n\n");
        s.push_str(&format!(
            "- linearizability (entry histories, {} keys): {:?}{}\n",
            c.linearizability.keys_checked,
            c.linearizability.verdict,
            if c.linearizability.failed_keys.is_empty() {
                String::new()
            } else {
                format!(" (keys: {})", c.linearizability.failed_keys.join(", "))
            }
        ));
        s.push_str(&format!(
            "- acknowledged writes lost: {}\n",
            c.lost_writes.len()
        ));
        s.push_str(&format!(
            "- join tokens: {} raced, {} attested, consumed twice: {}, never consumed: {}\n",
            c.tokens.tokens_raced,
            c.tokens.attested,
            c.tokens.double_attested.len(),
            c.tokens.never_consumed.len()
        ));
        s.push_str(&format!(
            "- servers converged to identical entries: {} ({:?})\n",
            c.convergence.identical, c.convergence.entries_per_node
        ));
        s.push_str(&format!(
            "- first write after each fault within {} ms: {}\n",
            c.recovery_bound_ms, c.recovery_within_bound
        ));
        if c.workloads.agents > 0 {
            s.push_str(&format!(
                "- workloads beside {} agents: {} looks, {} errors with a cached SVID, bundle \
                 sequence seen {} times, {} decreases\n",
                c.workloads.agents,
                c.workloads.looks,
                c.workloads.errors,
                c.workloads.sequences_seen,
                c.workloads.sequence_regressions.len()
            ));
        } else {
            s.push_str("- workloads and bundle sequence: not run (no agents in this run)\n");
        }
        s.push_str(&format!(
            "\nResult: {}\n",
            if c.passed() { "PASS" } else { "FAIL" }
        ));
        for f in &c.failures {
            s.push_str(&format!("- {f}\n"));
        }
        let window_notes: Vec<String> = self
            .windows
            .iter()
            .filter_map(|w| {
                w.note
                    .as_ref()
                    .map(|n| format!("{} at {:.1}s: {n}", w.fault, w.start_s))
            })
            .collect();
        if !self.notes.is_empty() || !window_notes.is_empty() {
            s.push_str("\n## Notes\n\n");
            for n in &window_notes {
                s.push_str(&format!("- {n}\n"));
            }
            for n in &self.notes {
                s.push_str(&format!("- {n}\n"));
            }
        }
        s
    }

    /// Reads `dir/report.json` back.
    pub fn read(dir: &Path) -> Result<Self, ReportError> {
        Ok(serde_json::from_slice(&std::fs::read(
            dir.join("report.json"),
        )?)?)
    }

    /// Writes report.json, summary.md and timeline.png into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("summary.md"), self.summary())?;
        self.plot(&dir.join("timeline.png"))
    }

    /// Throughput (top) and latency (bottom) per second, fault windows shaded.
    pub fn plot(&self, path: &Path) -> Result<(), ReportError> {
        register_font()?;
        let e = |x: &dyn std::fmt::Display| ReportError::Plot(x.to_string());
        let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (top, bottom) = root.split_vertically(450);
        let x_max = self.duration_s.max(1.0);
        let shade = RGBColor(230, 80, 60).mix(0.15);

        let y_tp = self
            .series
            .iter()
            .map(|b| b.started.max(b.acknowledged) as f64)
            .fold(1.0, f64::max)
            * 1.3;
        let mut ch = ChartBuilder::on(&top)
            .caption(
                "throughput, ops/s (blue: acknowledged, red: failed or indeterminate; shaded: faults)",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_tp)
            .map_err(|x| e(&x))?;
        ch.configure_mesh()
            .x_desc("seconds since start")
            .y_desc("ops/s")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|x| e(&x))?;
        // Many windows: short labels on three staggered rows so that neighbours do not overlap.
        let crowded = self.windows.len() > 6;
        for (i, w) in self.windows.iter().enumerate() {
            ch.draw_series(std::iter::once(Rectangle::new(
                [(w.start_s, 0.0), (w.heal_s.max(w.start_s + 0.2), y_tp)],
                shade.filled(),
            )))
            .map_err(|x| e(&x))?;
            let (label, row) = if crowded {
                (short_label(&w.fault), (i % 3) as f64)
            } else {
                (w.fault.clone(), 0.0)
            };
            ch.draw_series(std::iter::once(Text::new(
                label,
                (w.start_s, y_tp * (0.985 - 0.045 * row)),
                ("sans-serif", 14).into_font().color(&RGBColor(150, 30, 20)),
            )))
            .map_err(|x| e(&x))?;
        }
        ch.draw_series(LineSeries::new(
            self.series.iter().map(|b| (b.t_s, b.acknowledged as f64)),
            BLUE.stroke_width(2),
        ))
        .map_err(|x| e(&x))?;
        ch.draw_series(LineSeries::new(
            self.series.iter().map(|b| (b.t_s, b.failed as f64)),
            RED.stroke_width(2),
        ))
        .map_err(|x| e(&x))?;

        let y_lat = self
            .series
            .iter()
            .filter_map(|b| b.p99_latency_ms)
            .fold(1.0, f64::max)
            * 1.15;
        let mut ch = ChartBuilder::on(&bottom)
            .caption(
                "latency of acknowledged operations, ms (green: mean, magenta: p99)",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_lat)
            .map_err(|x| e(&x))?;
        ch.configure_mesh()
            .x_desc("seconds since start")
            .y_desc("ms")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|x| e(&x))?;
        for w in &self.windows {
            ch.draw_series(std::iter::once(Rectangle::new(
                [(w.start_s, 0.0), (w.heal_s.max(w.start_s + 0.2), y_lat)],
                shade.filled(),
            )))
            .map_err(|x| e(&x))?;
        }
        let mean: Vec<(f64, f64)> = self
            .series
            .iter()
            .filter_map(|b| b.mean_latency_ms.map(|m| (b.t_s, m)))
            .collect();
        let p99: Vec<(f64, f64)> = self
            .series
            .iter()
            .filter_map(|b| b.p99_latency_ms.map(|m| (b.t_s, m)))
            .collect();
        ch.draw_series(LineSeries::new(mean, GREEN.stroke_width(2)))
            .map_err(|x| e(&x))?;
        ch.draw_series(LineSeries::new(p99, MAGENTA.stroke_width(2)))
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
        Ok(())
    }
}

/// A fault's name shortened for a crowded plot ("kill-leader" -> "kill-L").
fn short_label(fault: &str) -> String {
    match fault.split_once('-') {
        Some((verb, "leader")) => format!("{verb}-L"),
        Some((verb, "follower")) => format!("{verb}-F"),
        Some((verb, _)) => verb.to_owned(),
        None => fault.to_owned(),
    }
}

/// Font files tried for plot text (DejaVu is Debian's `fonts-dejavu-core`).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<(), ReportError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let env = std::env::var("PLINTH_CHAOS_FONT").ok();
        let paths = env
            .iter()
            .map(String::as_str)
            .chain(FONT_PATHS.iter().copied());
        for p in paths {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps registered fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable font"));
            }
        }
        Err(format!(
            "no font for the plot (install fonts-dejavu-core or set PLINTH_CHAOS_FONT); tried {}",
            FONT_PATHS.join(", ")
        ))
    })
    .clone()
    .map_err(ReportError::Plot)
}

/// Per-second buckets from (call µs, end µs, acknowledged) samples.
pub fn buckets(samples: &[(u64, u64, bool)], duration_s: f64) -> Vec<Bucket> {
    let n = duration_s.ceil().max(1.0) as usize;
    let mut out: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            t_s: i as f64 + 0.5,
            ..Default::default()
        })
        .collect();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    for &(call, end, ok) in samples {
        let i = usize::try_from(end / 1_000_000).unwrap_or(usize::MAX);
        let Some(b) = out.get_mut(i) else { continue };
        b.started += 1;
        if ok {
            b.acknowledged += 1;
            lat[i].push(end.saturating_sub(call) as f64 / 1000.0);
        } else {
            b.failed += 1;
        }
    }
    for (b, l) in out.iter_mut().zip(lat.iter_mut()) {
        if l.is_empty() {
            continue;
        }
        l.sort_by(f64::total_cmp);
        b.mean_latency_ms = Some(l.iter().sum::<f64>() / l.len() as f64);
        let idx = ((l.len() as f64) * 0.99).ceil() as usize;
        b.p99_latency_ms = l.get(idx.saturating_sub(1).min(l.len() - 1)).copied();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::linearizability::Verdict;

    fn sample_report() -> Report {
        let samples: Vec<(u64, u64, bool)> = (0..400u64)
            .map(|i| (i * 25_000, i * 25_000 + 3_000 + (i % 7) * 1000, i % 13 != 0))
            .collect();
        let series = buckets(&samples, 10.0);
        Report {
            mode: "processes".into(),
            nodes: 3,
            clients: 4,
            duration_s: 10.0,
            windows: vec![FaultWindow {
                fault: "kill-leader".into(),
                targets: vec![1],
                start_s: 3.0,
                heal_s: 5.0,
                recovery_from: "injection".into(),
                recovery_ms: Some(900),
                within_bound: true,
                error: None,
                note: None,
            }],
            rows: vec![Row {
                phase: "kill-leader".into(),
                start_s: 3.0,
                end_s: 10.0,
                operations: 10,
                acknowledged: 9,
                indeterminate: 1,
                lost: 0,
                anomalies: 0,
                recovery_ms: Some(900),
            }],
            total: Row {
                phase: "total".into(),
                ..Default::default()
            },
            checks: Checks {
                linearizability: KeyedVerdict {
                    verdict: Verdict::Linearizable,
                    keys_checked: 3,
                    failed_keys: vec![],
                    unknown_keys: vec![],
                },
                lost_writes: vec![],
                tokens: TokenCheck::default(),
                convergence: Convergence {
                    identical: true,
                    ..Default::default()
                },
                recovery_bound_ms: 10_000,
                recovery_within_bound: true,
                workloads: WorkloadCheck::default(),
                failures: vec![],
            },
            series,
            notes: vec![],
            processes: vec![],
            docker_prefix: None,
        }
    }

    #[test]
    fn short_labels() {
        assert_eq!(short_label("kill-leader"), "kill-L");
        assert_eq!(short_label("partition-follower"), "partition-F");
        assert_eq!(short_label("member-change"), "member");
        assert_eq!(short_label("restart-all"), "restart");
    }

    #[test]
    fn buckets_count_and_latency() {
        let b = buckets(
            &[(0, 1000, true), (0, 3000, true), (0, 500_000, false)],
            2.0,
        );
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].started, 3);
        assert_eq!(b[0].acknowledged, 2);
        assert_eq!(b[0].failed, 1);
        assert_eq!(b[0].mean_latency_ms, Some(2.0));
        assert_eq!(b[0].p99_latency_ms, Some(3.0));
        assert_eq!(b[1].started, 0);
        assert_eq!(b[1].mean_latency_ms, None);
    }

    #[test]
    fn writes_json_summary_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample_report();
        r.write(dir.path()).unwrap();
        let back: Report =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back.windows[0].fault, "kill-leader");
        let summary = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(summary.contains("| kill-leader | 3.0-10.0 | 10 | 9 | 1 | 0 | 0 | 900 ms |"));
        assert!(summary.contains("Result: PASS"));
        let png = std::fs::read(dir.path().join("timeline.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
