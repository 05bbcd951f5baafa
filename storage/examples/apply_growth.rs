//! How the state machine's apply cost grows with the state: applies batches of 17 entry creates
//! (the batch size `raft-bench` sees at 64 clients) to a fresh store, single-threaded and
//! without Raft, and prints the time per created entry for every 10 000 entries.
//!
//! ```sh
//! cargo run --release -p plinth-storage --example apply_growth -- /var/tmp/apply-growth [rounds] [ordered|random]
//! ```
//!
//! Entry IDs are `ordered` (rising, as the server's time-ordered UUIDs are) or `random` (as
//! UUID v4s are, which the server made before). The directory is deleted first and left behind
//! for its RocksDB `LOG`. See docs/benchmarks.md ("plinth slowed down as its state grew").

use std::error::Error;
use std::time::Instant;

use plinth_spiffe::{Selectors, SpiffeId};
use plinth_storage::{Command, Proposal, RegistrationEntry, Store};

const PER_ROUND: u64 = 10_000;
const BATCH: u64 = 17;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "/var/tmp/apply-growth".into());
    let rounds: u64 = match args.next() {
        Some(r) => r.parse()?,
        None => 40,
    };
    let random_ids = match args.next().as_deref() {
        None | Some("ordered") => false,
        Some("random") => true,
        Some(other) => return Err(format!("IDs are ordered or random, not {other:?}").into()),
    };
    if std::path::Path::new(&dir).exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let store = Store::open(&dir)?;
    let parent = SpiffeId::new("spiffe://example.org/spire/agent/bench")?;
    let selectors = Selectors::parse_all(&["unix:uid:1000"])?;
    let (mut log_index, mut created) = (0u64, 0u64);
    println!("| entries | us per created entry |\n|---:|---:|");
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..PER_ROUND / BATCH {
            log_index += 1;
            let mut commands = Vec::new();
            for _ in 0..BATCH {
                created += 1;
                let id = if random_ids {
                    format!(
                        "{:032x}",
                        u128::from(created).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                    )
                } else {
                    format!("{created:032x}")
                };
                let spiffe_id = SpiffeId::new(&format!(
                    "spiffe://example.org/bench/c{}/{created:010}",
                    created % 64
                ))?;
                let mut entry =
                    RegistrationEntry::new(id, spiffe_id, parent.clone(), selectors.clone());
                entry.hint = "x".repeat(150);
                commands.push(Command::EntryCreate { entry });
            }
            let proposal = Proposal::at(1_000, Command::Batch { commands });
            store.apply(log_index, Some(&proposal), &log_index.to_be_bytes())?;
        }
        let per_entry = started.elapsed().as_secs_f64() * 1e6 / (PER_ROUND / BATCH * BATCH) as f64;
        println!("| {created} | {per_entry:.1} |");
    }
    Ok(())
}
