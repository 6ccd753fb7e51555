//! Joins a torchrun-style rendezvous and prints the payload rank 0 handed out: the multi-process
//! test of `kernels::comm::rendezvous`, and a quick check of a cluster's network before a long
//! NCCL run. Rank 0's payload stands in for an NCCL unique id: 128 bytes no other rank can guess.
//!
//! ```text
//! export WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
//! RANK=1 LOCAL_RANK=1 target/release/rendezvous-check &
//! RANK=0 LOCAL_RANK=0 target/release/rendezvous-check
//! ```
//!
//! Each process prints `rank R of N received 128 bytes: <hex>`; `RENDEZVOUS_TIMEOUT_S` (default
//! 60) bounds the wait.

use kernels::Rng;
use kernels::comm::rendezvous::{RendezvousConfig, RendezvousError, rendezvous};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 128 bytes from the clock and the process id: what `ncclGetUniqueId` would give, as far as the
/// other ranks can tell.
fn unique_id() -> Vec<u8> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(nanos ^ ((std::process::id() as u64) << 32));
    (0..16).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
}

fn timeout() -> Result<Duration, RendezvousError> {
    let name = "RENDEZVOUS_TIMEOUT_S";
    match std::env::var(name) {
        Err(_) => Ok(Duration::from_secs(60)),
        Ok(value) => match value.trim().parse::<f64>() {
            Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(Duration::from_secs_f64(seconds)),
            _ => Err(RendezvousError::Invalid { name, value, reason: "not a positive number of seconds".into() }),
        },
    }
}

fn run() -> Result<(), RendezvousError> {
    let config = RendezvousConfig::from_env()?;
    let payload = rendezvous(&config, unique_id, timeout()?)?;
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    println!("rank {} of {} received {} bytes: {hex}", config.rank, config.world_size, payload.len());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rendezvous-check: {e}");
            ExitCode::FAILURE
        }
    }
}
