//! `plinth-chaos`: runs a chaos scenario against a plinth cluster and writes a report.

fn main() {
    eprintln!("plinth-chaos: not wired yet");
    std::process::exit(2);
}
