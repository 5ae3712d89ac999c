//! The build identity stamped into every banger binary.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which build of banger this is. `banger`, `bangerd` and `banger-agent` from one build report the same
/// value, so a mismatch between them is visible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BuildInfo {
    /// Semantic version of the banger release.
    pub version: String,
    /// Git commit the binaries were built from (`-dirty` when the tree had uncommitted changes).
    pub commit: String,
    /// Build time, seconds since the Unix epoch (UTC): SOURCE_DATE_EPOCH when set, else the time of the
    /// commit built, so every compilation of one tree stamps the same value.
    pub build_time: i64,
}

impl BuildInfo {
    /// The build identity of the running binary.
    pub fn current() -> Self {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            commit: env!("BANGER_BUILD_COMMIT").to_string(),
            build_time: env!("BANGER_BUILD_TIME").parse().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for BuildInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (commit {}, built {})", self.version, self.commit, self.build_date())
    }
}

impl BuildInfo {
    /// The build time as an RFC 3339 date in UTC (`2026-11-30T12:00:00Z`), for people to read.
    pub fn build_date(&self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.build_time.max(0) as u64);
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn build_time_prints_as_an_rfc3339_date() {
        let b = super::BuildInfo { version: "0.1.0".into(), commit: "abc".into(), build_time: 1_764_590_400 };
        assert_eq!(b.build_date(), "2025-12-01T12:00:00Z");
        assert_eq!(b.to_string(), "0.1.0 (commit abc, built 2025-12-01T12:00:00Z)");
    }
}
