//! A bundle's files by name (`*.cedar` policies, the schema, the entity data
//! and the test cases): their bounds, canonical encoding, digest and diff;
//! and the bundle a new control plane starts with.

use std::collections::BTreeMap;
use std::path::Path;

use super::PolicyError;
pub use crate::limits::MAX_BUNDLE_BYTES;

pub const SCHEMA_FILE: &str = "schema.cedarschema";
pub const ENTITIES_FILE: &str = "entities.json";
pub const TESTS_FILE: &str = "tests.json";
/// File count and file name length of a bundle, and its test cases.
pub const MAX_FILES: usize = 256;
pub const MAX_FILE_NAME: usize = 128;
pub const MAX_TEST_CASES: usize = 10_000;

/// The bundle a new control plane starts with (see `shared/policies/default`).
pub fn default_bundle() -> BundleFiles {
    BundleFiles::from_files([
        (
            SCHEMA_FILE.to_string(),
            include_str!("../../policies/default/schema.cedarschema").to_string(),
        ),
        (
            "lattice.cedar".to_string(),
            include_str!("../../policies/default/lattice.cedar").to_string(),
        ),
        (
            ENTITIES_FILE.to_string(),
            include_str!("../../policies/default/entities.json").to_string(),
        ),
        (
            TESTS_FILE.to_string(),
            include_str!("../../policies/default/tests.json").to_string(),
        ),
    ])
    .expect("the built-in default bundle is well-formed") // checked by a unit test
}

/// The lattice schema, as the default bundle carries it.
pub fn lattice_schema_text() -> &'static str {
    include_str!("../../policies/default/schema.cedarschema")
}

/// The files of a bundle by name: `*.cedar` policies, the schema, the entity
/// data and the test cases. Ordered, so that its encoding and digest are
/// canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleFiles {
    files: BTreeMap<String, String>,
}

fn is_bundle_file(name: &str) -> bool {
    name.ends_with(".cedar") || name == SCHEMA_FILE || name == ENTITIES_FILE || name == TESTS_FILE
}

impl BundleFiles {
    pub fn from_files(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, PolicyError> {
        let mut out = BTreeMap::new();
        let mut total = 0usize;
        for (name, content) in files {
            if name.is_empty()
                || name.len() > MAX_FILE_NAME
                || name.contains(['/', '\\'])
                || name.starts_with('.')
                || !is_bundle_file(&name)
            {
                return Err(PolicyError::Bundle(format!(
                    "{name:?} is not a bundle file name (*.cedar, {SCHEMA_FILE}, {ENTITIES_FILE}, {TESTS_FILE})"
                )));
            }
            total += name.len() + content.len();
            if total > MAX_BUNDLE_BYTES {
                return Err(PolicyError::Bundle(format!(
                    "bundle is larger than {MAX_BUNDLE_BYTES} bytes"
                )));
            }
            if out.insert(name.clone(), content).is_some() {
                return Err(PolicyError::Bundle(format!("{name:?} appears twice")));
            }
            if out.len() > MAX_FILES {
                return Err(PolicyError::Bundle(format!("more than {MAX_FILES} files")));
            }
        }
        Ok(Self { files: out })
    }

    /// Reads the bundle files of `dir` (not recursive; other files such as a
    /// README are ignored).
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let io = |err| PolicyError::Io {
            path: dir.display().to_string(),
            err,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().map_err(io)?.is_file() || !is_bundle_file(&name) {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(io)?;
            if meta.len() > MAX_BUNDLE_BYTES as u64 {
                return Err(PolicyError::Bundle(format!(
                    "{} is larger than {MAX_BUNDLE_BYTES} bytes",
                    path.display()
                )));
            }
            let content = std::fs::read_to_string(&path).map_err(|err| PolicyError::Io {
                path: path.display().to_string(),
                err,
            })?;
            files.push((name, content));
        }
        Self::from_files(files)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn to_proto(&self) -> crate::proto::PolicyBundleFiles {
        crate::proto::PolicyBundleFiles {
            files: self
                .files
                .iter()
                .map(|(path, content)| crate::proto::PolicyFile {
                    path: path.clone(),
                    content: content.clone(),
                })
                .collect(),
        }
    }

    pub fn from_proto(p: &crate::proto::PolicyBundleFiles) -> Result<Self, PolicyError> {
        Self::from_files(p.files.iter().map(|f| (f.path.clone(), f.content.clone())))
    }

    /// SHA-256 of the canonical encoding (files sorted by name).
    pub fn sha256(&self) -> [u8; 32] {
        use prost::Message;
        crate::pki::sha256(&self.to_proto().encode_to_vec())
    }

    /// A readable, line-level diff from `self` to `new`.
    pub fn diff(&self, new: &BundleFiles) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let names: std::collections::BTreeSet<&String> =
            self.files.keys().chain(new.files.keys()).collect();
        for name in names {
            let old = self.files.get(name).map(String::as_str).unwrap_or("");
            let newer = new.files.get(name).map(String::as_str).unwrap_or("");
            if old == newer {
                continue;
            }
            let d = similar::TextDiff::from_lines(old, newer);
            let _ = write!(
                out,
                "{}",
                d.unified_diff()
                    .context_radius(3)
                    .header(&format!("a/{name}"), &format!("b/{name}"))
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::with;

    #[test]
    fn bundle_names_and_sizes_are_bounded() {
        assert!(BundleFiles::from_files([("../x.cedar".into(), String::new())]).is_err());
        assert!(BundleFiles::from_files([("notes.txt".into(), String::new())]).is_err());
        assert!(
            BundleFiles::from_files([("a.cedar".into(), "x".repeat(MAX_BUNDLE_BYTES + 1))])
                .is_err()
        );
    }

    #[test]
    fn diff_shows_changed_lines() {
        let a = default_bundle();
        let b = with(&[("extra.cedar", "forbid(principal, action, resource);\n")]);
        let d = a.diff(&b);
        assert!(
            d.contains("+++ b/extra.cedar") && d.contains("+forbid"),
            "{d}"
        );
        assert!(a.diff(&a).is_empty());
    }
}
