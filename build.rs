//! Build facts for `newapi_exporter_build_info`: the git revision and branch of the source and
//! the compiler's version. A build outside a git checkout (a source tarball, a container build
//! without `.git`) reports `unknown`, unless NEWAPI_BUILD_REVISION / NEWAPI_BUILD_BRANCH say.

use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    for var in ["NEWAPI_BUILD_REVISION", "NEWAPI_BUILD_BRANCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::path::Path::new(".git/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/refs/heads");
    }
    let revision = std::env::var("NEWAPI_BUILD_REVISION")
        .ok()
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let branch = std::env::var("NEWAPI_BUILD_BRANCH")
        .ok()
        .or_else(|| output("git", &["rev-parse", "--abbrev-ref", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rust_version = output(&rustc, &["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NEWAPI_BUILD_REVISION={revision}");
    println!("cargo:rustc-env=NEWAPI_BUILD_BRANCH={branch}");
    println!("cargo:rustc-env=NEWAPI_BUILD_RUST_VERSION={rust_version}");
}
