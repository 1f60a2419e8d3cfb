//! What the CLI prints: plain lines and pretty JSON on stdout, where a closed pipe (`clusterctl
//! events | head`) ends the program quietly with exit code 0.

use std::io::Write;

/// Writes to stdout; a closed pipe (`clusterctl events | head`) ends the program quietly with 0.
pub fn out(text: impl std::fmt::Display) {
    let mut o = std::io::stdout().lock();
    if writeln!(o, "{text}").and_then(|_| o.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Prints a value as pretty JSON (the `--json` output of every read command).
pub fn out_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    out(serde_json::to_string_pretty(v)?);
    Ok(())
}
