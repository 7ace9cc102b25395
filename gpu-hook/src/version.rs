//! Dotted numeric versions as NVIDIA's requirements compare them: CUDA `12.4`, driver
//! `550.54.15`, compute capability (`arch`) `8.0`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A version of one or more numeric components; missing components compare as 0, so
/// `12.4` equals `12.4.0`.
#[derive(Debug, Clone, Eq)]
pub struct Version(Vec<u64>);

/// A string that is not a dotted numeric version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a version (numbers separated by dots, such as 12.4 or 550.54.15)")]
pub struct VersionError(pub String);

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse).collect();
        match parts {
            Ok(parts) if !s.is_empty() => Ok(Version(parts)),
            _ => Err(VersionError(s.to_owned())),
        }
    }
}

impl Version {
    fn component(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.0.len().max(other.0.len());
        (0..len)
            .map(|i| self.component(i).cmp(&other.component(i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn compares_by_component_with_missing_ones_as_zero() {
        assert!(v("12.4") > v("12.2"));
        assert!(v("12.10") > v("12.9"));
        assert_eq!(v("12.4"), v("12.4.0"));
        assert!(v("550.54.15") > v("550.54.14"));
        assert!(v("535") < v("535.104.05"));
        assert_eq!(v("8.0").to_string(), "8.0");
    }

    #[test]
    fn refuses_what_is_not_a_version() {
        for bad in ["", "12.", ".4", "12.x", "v12", "12 4", "-1"] {
            assert_eq!(
                bad.parse::<Version>(),
                Err(VersionError(bad.to_owned())),
                "{bad:?}"
            );
        }
    }
}
