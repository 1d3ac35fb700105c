//! `secret` objects, as QEMU takes them: `--object secret,id=,data=|file=
//! [,format=raw|base64]`. Drivers name them (`rbd`'s `key-secret`) instead
//! of carrying keys in their own options, which `query-named-block-nodes`
//! would show.

use std::collections::HashMap;
use std::sync::Mutex;

use data_encoding::BASE64;

use crate::options::{Options, OptionsError};

/// The most a secret may hold: keys and passwords, not files.
const MAX_SECRET: u64 = 64 * 1024;

/// The daemon's secrets, by id.
#[derive(Default)]
pub struct Secrets(Mutex<HashMap<String, Vec<u8>>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids only: never the values.
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        f.debug_tuple("Secrets").field(&ids).finish()
    }
}

fn invalid(msg: String) -> OptionsError {
    OptionsError::Invalid(msg)
}

impl Secrets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds secret `id` from its options (`data` or `file`, and `format`).
    pub fn add(&self, id: &str, o: &mut Options) -> Result<(), OptionsError> {
        for unsupported in ["keyid", "iv"] {
            if o.has(unsupported) {
                return Err(invalid(format!(
                    "secret '{id}': '{unsupported}' (secrets encrypted with another secret) is not supported"
                )));
            }
        }
        let format = o.take_enum("format", &["raw", "base64"])?;
        let given = match (o.take_str("data")?, o.take_str("file")?) {
            (Some(d), None) => d.into_bytes(),
            (None, Some(path)) => {
                let len = std::fs::metadata(&path)
                    .map_err(|e| invalid(format!("secret '{id}': cannot read '{path}': {e}")))?
                    .len();
                if len > MAX_SECRET {
                    return Err(invalid(format!(
                        "secret '{id}': '{path}' holds {len} bytes, more than a secret may ({MAX_SECRET})"
                    )));
                }
                std::fs::read(&path)
                    .map_err(|e| invalid(format!("secret '{id}': cannot read '{path}': {e}")))?
            }
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "secret '{id}': give 'data' or 'file', not both"
                )))
            }
            (None, None) => {
                return Err(invalid(format!(
                    "secret '{id}': 'data' or 'file' is required"
                )))
            }
        };
        let value = if format.as_deref() == Some("base64") {
            let text: Vec<u8> = given
                .into_iter()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            BASE64
                .decode(&text)
                .map_err(|e| invalid(format!("secret '{id}': the data is not base64: {e}")))?
        } else {
            given
        };
        let mut map = self.lock();
        if map.contains_key(id) {
            return Err(invalid(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        map.insert(id.to_owned(), value);
        Ok(())
    }

    /// Removes secret `id`; `false` if there is none.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    /// Secret `id`, base64-encoded, as QEMU hands keys to librados.
    pub fn base64(&self, id: &str) -> Result<String, String> {
        self.lock()
            .get(id)
            .map(|v| BASE64.encode(v))
            .ok_or_else(|| format!("no secret with id '{id}' (add a secret object)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add(s: &Secrets, id: &str, v: serde_json::Value) -> Result<(), String> {
        let mut o = Options::from_json(v).unwrap();
        s.add(id, &mut o).map_err(|e| e.to_string())
    }

    #[test]
    fn secrets_come_from_data_or_files_and_print_no_value() {
        let s = Secrets::default();
        let key = BASE64.encode(&[7; 28]);
        add(&s, "k", json!({"data": key, "format": "base64"})).unwrap();
        assert_eq!(s.base64("k").unwrap(), key);
        add(&s, "r", json!({"data": "pw"})).unwrap();
        assert_eq!(s.base64("r").unwrap(), BASE64.encode(b"pw"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, format!("{key}\n")).unwrap();
        add(&s, "f", json!({"file": f, "format": "base64"})).unwrap();
        assert_eq!(s.base64("f").unwrap(), key);
        assert!(!format!("{s:?}").contains(&key));
        assert!(s.base64("none").unwrap_err().contains("'none'"));
        assert!(s.remove("k") && !s.remove("k"));
    }

    #[test]
    fn bad_secrets_say_what_is_wrong() {
        let s = Secrets::default();
        for (v, want) in [
            (json!({}), "'data' or 'file' is required"),
            (json!({"data": "a", "file": "/x"}), "not both"),
            (json!({"data": "!!", "format": "base64"}), "not base64"),
            (
                json!({"file": "/nonexistent"}),
                "cannot read '/nonexistent'",
            ),
            (json!({"data": "a", "keyid": "k"}), "'keyid'"),
        ] {
            let e = add(&s, "x", v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
        add(&s, "d", json!({"data": "a"})).unwrap();
        assert!(add(&s, "d", json!({"data": "b"}))
            .unwrap_err()
            .contains("duplicate"));
    }
}
