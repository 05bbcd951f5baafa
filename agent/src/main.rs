//! The `plinth-agent` binary.

fn main() {
    eprintln!("plinth-agent: no command yet");
    std::process::exit(2);
}
