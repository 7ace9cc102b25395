//! `NVIDIA_REQUIRE_*`: what a container needs of the node, checked before it gets GPUs.
//!
//! Each variable whose name starts with `NVIDIA_REQUIRE_` holds an expression: alternatives
//! separated by spaces, any of which may hold, each a comma-separated list of constraints
//! that must all hold. Every such variable must hold. A constraint is `KEY OP VALUE` with
//! `OP` one of `=`, `==`, `!=`, `<`, `<=`, `>`, `>=` and `KEY` one of:
//! - `cuda`: the highest CUDA version the driver supports (a version);
//! - `driver`: the driver's version;
//! - `arch`: every requested GPU's compute capability (`8.0`);
//! - `brand`: every requested GPU's brand (`tesla`, `geforce`, ...; `=` and `!=` only, any
//!   case).
//!
//! A legacy CUDA image (`CUDA_VERSION` set, `NVIDIA_REQUIRE_CUDA` not) requires
//! `cuda>=MAJOR.MINOR` of its `CUDA_VERSION`. `NVIDIA_DISABLE_REQUIRE` set to a true value
//! (`1`, `t`, `true`, ... as Go's `strconv.ParseBool` reads them) turns all of it off. The
//! toolkit checks these only in its legacy mode; HyperBox checks them in every mode.

use crate::request::{Environment, CUDA_VERSION};
use crate::version::{Version, VersionError};

/// The prefix of the requirement variables.
pub const REQUIRE_PREFIX: &str = "NVIDIA_REQUIRE_";
/// The variable that turns requirements off.
pub const DISABLE_REQUIRE: &str = "NVIDIA_DISABLE_REQUIRE";

/// Errors reading requirements, and requirements the node does not meet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequireError {
    #[error("{var}: {constraint:?} is not a constraint: expected KEY OP VALUE, KEY one of cuda, driver, arch, brand, OP one of = == != < <= > >=")]
    Malformed { var: String, constraint: String },
    #[error("{var}: {constraint:?}: {source}")]
    BadVersion {
        var: String,
        constraint: String,
        source: VersionError,
    },
    #[error("{var}: {constraint:?}: a brand can only be compared with = or !=")]
    BrandOrder { var: String, constraint: String },
    #[error("{CUDA_VERSION}={0:?} is not a CUDA version")]
    LegacyCudaVersion(String),
    #[error("this node does not meet {var}={expression:?} ({facts})")]
    Unmet {
        var: String,
        expression: String,
        facts: String,
    },
}

/// What a constraint is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Cuda,
    Driver,
    Arch,
    Brand,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Eq => ordering == Equal,
            Op::Ne => ordering != Equal,
            Op::Lt => ordering == Less,
            Op::Le => ordering != Greater,
            Op::Gt => ordering == Greater,
            Op::Ge => ordering != Less,
        }
    }
}

/// The value a constraint compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Version(Version),
    Brand(String),
}

/// One `KEY OP VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub key: Key,
    pub op: Op,
    pub value: Value,
}

impl Constraint {
    fn parse(var: &str, text: &str) -> Result<Self, RequireError> {
        let malformed = || RequireError::Malformed {
            var: var.to_owned(),
            constraint: text.to_owned(),
        };
        // Longest operators first, so `>=` is not read as `>` then `=VALUE`.
        const OPS: [(&str, Op); 7] = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("!=", Op::Ne),
            ("==", Op::Eq),
            ("=", Op::Eq),
            (">", Op::Gt),
            ("<", Op::Lt),
        ];
        let (at, len, op) = OPS
            .iter()
            .filter_map(|(s, op)| text.find(s).map(|at| (at, s.len(), *op)))
            .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)))
            .ok_or_else(malformed)?;
        let (name, value) = (&text[..at], &text[at + len..]);
        let key = match name {
            "cuda" => Key::Cuda,
            "driver" => Key::Driver,
            "arch" => Key::Arch,
            "brand" => Key::Brand,
            _ => return Err(malformed()),
        };
        if value.is_empty() {
            return Err(malformed());
        }
        let value = if key == Key::Brand {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(RequireError::BrandOrder {
                    var: var.to_owned(),
                    constraint: text.to_owned(),
                });
            }
            Value::Brand(value.to_ascii_lowercase())
        } else {
            Value::Version(value.parse().map_err(|source| RequireError::BadVersion {
                var: var.to_owned(),
                constraint: text.to_owned(),
                source,
            })?)
        };
        Ok(Constraint { key, op, value })
    }

    fn holds(&self, node: &NodeFacts) -> bool {
        let version = |have: &Version| match &self.value {
            Value::Version(want) => self.op.holds(have.cmp(want)),
            Value::Brand(_) => false,
        };
        match self.key {
            Key::Cuda => version(&node.cuda),
            Key::Driver => version(&node.driver),
            // Every requested GPU; with none requested there is nothing to contradict.
            Key::Arch => node.gpus.iter().all(|g| version(&g.arch)),
            Key::Brand => node.gpus.iter().all(|g| match &self.value {
                Value::Brand(want) => {
                    let same = g.brand.eq_ignore_ascii_case(want);
                    if self.op == Op::Eq {
                        same
                    } else {
                        !same
                    }
                }
                Value::Version(_) => false,
            }),
        }
    }
}

/// One requirement variable: alternatives (any), each constraints (all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub var: String,
    pub expression: String,
    pub alternatives: Vec<Vec<Constraint>>,
}

/// The requested GPUs as the requirements see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFacts {
    /// Compute capability, `8.0`.
    pub arch: Version,
    /// Brand as NVML names it, `tesla`.
    pub brand: String,
}

/// What the node offers, for the requested GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The highest CUDA version the driver supports.
    pub cuda: Version,
    pub driver: Version,
    pub gpus: Vec<GpuFacts>,
}

impl NodeFacts {
    fn describe(&self) -> String {
        let gpus: Vec<String> = self
            .gpus
            .iter()
            .map(|g| format!("arch {} brand {}", g.arch, g.brand))
            .collect();
        format!(
            "cuda {}, driver {}, GPUs: [{}]",
            self.cuda,
            self.driver,
            gpus.join("; ")
        )
    }
}

/// Every requirement of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements(pub Vec<Requirement>);

/// Go's `strconv.ParseBool` true values.
fn go_true(value: &str) -> bool {
    matches!(value, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

impl Requirements {
    /// The requirements `env` states (see the module's documentation).
    pub fn from_env(env: &Environment) -> Result<Self, RequireError> {
        if env.get(DISABLE_REQUIRE).is_some_and(go_true) {
            return Ok(Requirements::default());
        }
        let mut all = Vec::new();
        let legacy = env
            .is_legacy_cuda()
            .then(|| {
                let version = env.get(CUDA_VERSION).unwrap_or_default();
                let major_minor: Vec<&str> = version.split('.').take(2).collect();
                let text = major_minor.join(".");
                text.parse::<Version>()
                    .map(|_| {
                        (
                            "NVIDIA_REQUIRE_CUDA (legacy image)".to_owned(),
                            format!("cuda>={text}"),
                        )
                    })
                    .map_err(|_| RequireError::LegacyCudaVersion(version.to_owned()))
            })
            .transpose()?;
        let stated = env
            .with_prefix(REQUIRE_PREFIX)
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        for (var, expression) in legacy.into_iter().chain(stated) {
            let alternatives = expression
                .split_whitespace()
                .map(|alt| {
                    alt.split(',')
                        .filter(|c| !c.is_empty())
                        .map(|c| Constraint::parse(&var, c))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()?;
            if alternatives.is_empty() {
                continue;
            }
            all.push(Requirement {
                var,
                expression,
                alternatives,
            });
        }
        Ok(Requirements(all))
    }

    /// Checks every requirement against `node`; the first unmet one is the error.
    pub fn check(&self, node: &NodeFacts) -> Result<(), RequireError> {
        for r in &self.0 {
            let met = r
                .alternatives
                .iter()
                .any(|alt| alt.iter().all(|c| c.holds(node)));
            if !met {
                return Err(RequireError::Unmet {
                    var: r.var.clone(),
                    expression: r.expression.clone(),
                    facts: node.describe(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cuda: &str, driver: &str, gpus: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            cuda: cuda.parse().unwrap(),
            driver: driver.parse().unwrap(),
            gpus: gpus
                .iter()
                .map(|(arch, brand)| GpuFacts {
                    arch: arch.parse().unwrap(),
                    brand: (*brand).to_owned(),
                })
                .collect(),
        }
    }

    fn check(entries: &[&str], node: &NodeFacts) -> Result<(), RequireError> {
        Requirements::from_env(&Environment::from_entries(entries))?.check(node)
    }

    #[test]
    fn spaces_are_or_commas_are_and_variables_are_and() {
        let a100 = node("12.4", "550.54.15", &[("8.0", "Tesla")]);
        let t4 = node("12.2", "535.104.05", &[("7.5", "tesla")]);
        // The CUDA 12.4 image's own requirement, shortened.
        let cuda = "NVIDIA_REQUIRE_CUDA=cuda>=12.4 brand=tesla,driver>=470,driver<471 \
                    brand=tesla,driver>=535,driver<536";
        assert_eq!(check(&[cuda], &a100), Ok(()));
        // T4 node: CUDA 12.2 fails the first alternative; driver 535 and tesla meet the third.
        assert_eq!(check(&[cuda], &t4), Ok(()));
        let geforce = node("12.2", "535.104.05", &[("8.6", "GeForce")]);
        let err = check(&[cuda], &geforce).unwrap_err();
        assert!(
            matches!(&err, RequireError::Unmet { var, .. } if var == "NVIDIA_REQUIRE_CUDA"),
            "{err}"
        );
        assert!(err.to_string().contains("brand GeForce"), "{err}");
        // A second variable must hold too.
        let arch = "NVIDIA_REQUIRE_ARCH=arch>=8.0";
        assert_eq!(check(&[cuda, arch], &a100), Ok(()));
        assert!(check(&[cuda, arch], &t4).is_err());
    }

    #[test]
    fn every_operator() {
        let n = node("12.4", "550.54.15", &[("8.0", "tesla")]);
        for (expr, holds) in [
            ("cuda=12.4", true),
            ("cuda==12.4.0", true),
            ("cuda!=12.4", false),
            ("cuda<12.4", false),
            ("cuda<=12.4", true),
            ("cuda>12.3", true),
            ("cuda>=12.5", false),
            ("driver>=550.54.15", true),
            ("driver>550.54.15", false),
            ("arch<9", true),
            ("brand=TESLA", true),
            ("brand!=tesla", false),
        ] {
            let got = check(&[&format!("NVIDIA_REQUIRE_X={expr}")], &n);
            assert_eq!(got.is_ok(), holds, "{expr}: {got:?}");
        }
    }

    #[test]
    fn arch_and_brand_hold_for_every_requested_gpu() {
        let mixed = node("12.4", "550.54.15", &[("8.0", "tesla"), ("7.0", "tesla")]);
        assert!(check(&["NVIDIA_REQUIRE_ARCH=arch>=8.0"], &mixed).is_err());
        assert!(check(&["NVIDIA_REQUIRE_ARCH=arch>=7.0"], &mixed).is_ok());
        let none = node("12.4", "550.54.15", &[]);
        assert!(check(&["NVIDIA_REQUIRE_ARCH=arch>=9.0"], &none).is_ok());
    }

    #[test]
    fn a_legacy_image_requires_its_cuda_version() {
        let n = node("10.2", "440.33", &[("7.0", "tesla")]);
        assert!(check(&["CUDA_VERSION=10.1.243"], &n).is_ok());
        let err = check(&["CUDA_VERSION=11.0.3"], &n).unwrap_err();
        assert!(err.to_string().contains("cuda>=11.0"), "{err}");
        // A current image states its own requirement instead.
        assert!(check(
            &["CUDA_VERSION=11.0.3", "NVIDIA_REQUIRE_CUDA=cuda>=10.0"],
            &n
        )
        .is_ok());
        assert_eq!(
            check(&["CUDA_VERSION=eleven"], &n),
            Err(RequireError::LegacyCudaVersion("eleven".into()))
        );
    }

    #[test]
    fn disable_require_turns_everything_off() {
        let n = node("10.2", "440.33", &[]);
        for on in ["1", "t", "T", "true", "TRUE", "True"] {
            let e = [
                "NVIDIA_REQUIRE_CUDA=cuda>=99",
                &format!("NVIDIA_DISABLE_REQUIRE={on}"),
            ];
            assert_eq!(check(&e, &n), Ok(()), "{on}");
        }
        for off in ["0", "false", "yes", ""] {
            let e = [
                "NVIDIA_REQUIRE_CUDA=cuda>=99",
                &format!("NVIDIA_DISABLE_REQUIRE={off}"),
            ];
            assert!(check(&e, &n).is_err(), "{off}");
        }
    }

    #[test]
    fn malformed_constraints_are_named() {
        let n = node("12.4", "550.54.15", &[]);
        for bad in [
            "cuda",
            "cuda>=",
            "gpu>=1",
            ">=12",
            "cuda~12",
            "cuda>=12.x",
            "brand>tesla",
        ] {
            let err = check(&[&format!("NVIDIA_REQUIRE_CUDA={bad}")], &n).unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
            assert!(!matches!(err, RequireError::Unmet { .. }), "{bad}: {err}");
        }
        // Empty variables and stray commas state nothing.
        assert_eq!(
            check(&["NVIDIA_REQUIRE_CUDA=", "NVIDIA_REQUIRE_X= ,, "], &n),
            Ok(())
        );
    }
}
