//! pd-prefill: parse the configuration and run the prefill node until SIGINT/SIGTERM.

use clap::Parser;

/// Long-running nodes keep their allocations: glibc's malloc returned large freed blocks to the
/// kernel and faulted them in again every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let config = pd_prefill::PrefillConfig::parse();
    if let Err(e) = pd_prefill::main_with(config).await {
        eprintln!("pd-prefill: {e}");
        std::process::exit(1);
    }
}
