//! Finding the workspace root from wherever a test or command runs.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// The nearest ancestor holding `pgharness.toml`, else the outermost one whose
/// `Cargo.toml` declares `[workspace]`, starting from `CARGO_MANIFEST_DIR` (set by cargo
/// and nextest for tests) or the current directory.
pub(crate) fn find_root() -> Result<PathBuf, Error> {
    let start = match std::env::var_os("CARGO_MANIFEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_dir()
            .map_err(|e| Error::io("failed to read the current directory", ".", e))?,
    };
    Ok(root_from(&start))
}

pub(crate) fn root_from(start: &Path) -> PathBuf {
    let mut workspace = None;
    for dir in start.ancestors() {
        if dir.join("pgharness.toml").is_file() {
            return dir.to_path_buf();
        }
        let manifest = dir.join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&manifest)
            && text.lines().any(|line| line.trim() == "[workspace]")
        {
            workspace = Some(dir.to_path_buf());
        }
    }
    workspace.unwrap_or_else(|| start.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_workspace_from_a_member() {
        let member = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = root_from(member);
        assert!(
            root.join("crates/pgharness/Cargo.toml").is_file(),
            "{}",
            root.display()
        );
    }
}
