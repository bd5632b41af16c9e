//! `torii-cni`: run by a container runtime with the `CNI_*` environment and the network
//! configuration on stdin; prints the result (or a CNI error) on stdout.

use std::io::Read;
use std::process::ExitCode;

use torii_cni::config::Env;
use torii_cni::plugin;
use torii_cni::types::{CniError, Code};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors are reported in the version the configuration asked for, when it says.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .unwrap_or_else(|| "1.1.0".into());
    let result = read
        .map_err(|e| CniError::new(Code::Io, format!("reading stdin: {e}")))
        .and_then(|_| Env::read(|k| std::env::var(k).ok()))
        .and_then(|env| plugin::run(&env, &stdin));
    match result {
        Ok(out) => {
            if let Some(v) = out {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("torii-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
