//! Driver options as QMP and the command line give them: a JSON object.
//!
//! From QMP or `--blockdev '{json}'` the JSON types must be right. From the
//! dotted command line (`size=1G,read-zeroes=on`) every value is a string,
//! and the typed accessors parse it, as QEMU's keyval visitor does. Every
//! error names the parameter by its full path (`file.filename`).

use serde_json::{Map, Value};

/// A bad option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A required parameter is absent.
    #[error("Parameter '{param}' is missing")]
    Missing {
        /// Its full name.
        param: String,
    },
    /// A parameter nobody takes.
    #[error("Parameter '{param}' is unexpected")]
    Unknown {
        /// Its full name.
        param: String,
    },
    /// The JSON type is wrong.
    #[error("Invalid parameter type for '{param}', expected: {expected}")]
    Type {
        /// Its full name.
        param: String,
        /// What it must be.
        expected: &'static str,
    },
    /// The value is of the right type but not acceptable.
    #[error("Parameter '{param}' expects {expected}")]
    Value {
        /// Its full name.
        param: String,
        /// What it accepts.
        expected: String,
    },
    /// Options that are well formed but cannot be used, with why.
    #[error("{0}")]
    Invalid(String),
}

/// A child given as an option: a node's name, a node to create, or none.
#[derive(Debug)]
pub enum ChildOption {
    /// An existing node, by name.
    Reference(String),
    /// A node to create from these options.
    Inline(Options),
    /// Explicitly no child (`"backing": null`).
    Null,
}

/// A JSON object of options, consumed key by key.
#[derive(Clone, Debug)]
pub struct Options {
    map: Map<String, Value>,
    prefix: String,
    strings: bool,
}

impl Options {
    /// Options with exact JSON types (QMP, `--blockdev '{...}'`).
    pub fn from_json(value: Value) -> Result<Options, OptionsError> {
        Self::object(value, String::new(), false)
    }

    /// Options from the dotted command line, where scalars are strings.
    pub fn from_keyval(value: Value) -> Result<Options, OptionsError> {
        Self::object(value, String::new(), true)
    }

    fn object(value: Value, prefix: String, strings: bool) -> Result<Options, OptionsError> {
        match value {
            Value::Object(map) => Ok(Options {
                map,
                prefix,
                strings,
            }),
            _ => Err(OptionsError::Type {
                param: prefix.trim_end_matches('.').to_owned(),
                expected: "object",
            }),
        }
    }

    /// The full name of `key` here.
    pub fn param(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// True when `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The remaining options as JSON (for reporting, reopen defaults).
    pub fn to_json(&self) -> Value {
        Value::Object(self.map.clone())
    }

    /// Removes and returns `key` as raw JSON.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    fn type_error(&self, key: &str, expected: &'static str) -> OptionsError {
        OptionsError::Type {
            param: self.param(key),
            expected,
        }
    }

    /// A string.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.type_error(key, "string")),
        }
    }

    /// A boolean (`on`/`off`/`true`/`false` from the command line).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if self.strings => match s.as_str() {
                "on" | "true" | "yes" => Ok(Some(true)),
                "off" | "false" | "no" => Ok(Some(false)),
                _ => Err(OptionsError::Value {
                    param: self.param(key),
                    expected: "'on' or 'off'".into(),
                }),
            },
            Some(_) => Err(self.type_error(key, "boolean")),
        }
    }

    /// A non-negative integer.
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| OptionsError::Value {
                param: self.param(key),
                expected: "a non-negative integer".into(),
            }),
            Some(Value::String(s)) if self.strings => {
                s.parse().map(Some).map_err(|_| OptionsError::Value {
                    param: self.param(key),
                    expected: "a non-negative integer".into(),
                })
            }
            Some(_) => Err(self.type_error(key, "integer")),
        }
    }

    /// A list of non-negative integers (`key.0=`, `key.1=` on the command
    /// line).
    pub fn take_u64_list(&mut self, key: &str) -> Result<Option<Vec<u64>>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Number(n) => n.as_u64().ok_or_else(|| OptionsError::Value {
                        param: format!("{}[{i}]", self.param(key)),
                        expected: "a non-negative integer".into(),
                    }),
                    Value::String(s) if self.strings => {
                        s.parse().map_err(|_| OptionsError::Value {
                            param: format!("{}.{i}", self.param(key)),
                            expected: "a non-negative integer".into(),
                        })
                    }
                    _ => Err(OptionsError::Type {
                        param: format!("{}[{i}]", self.param(key)),
                        expected: "integer",
                    }),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(self.type_error(key, "array")),
        }
    }

    /// An integer that may be negative.
    pub fn take_i64(&mut self, key: &str) -> Result<Option<i64>, OptionsError> {
        let param = self.param(key);
        let expected = || OptionsError::Value {
            param,
            expected: "an integer".into(),
        };
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(expected),
            Some(Value::String(s)) if self.strings => s.parse().map(Some).map_err(|_| expected()),
            Some(_) => Err(self.type_error(key, "integer")),
        }
    }

    /// A size in bytes; from the command line, `K`/`M`/`G`/`T`/`P`
    /// suffixes (powers of 1024) are allowed.
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, OptionsError> {
        match self.map.remove(key) {
            Some(Value::String(s)) if self.strings => {
                parse_size(&s).map(Some).ok_or_else(|| OptionsError::Value {
                    param: self.param(key),
                    expected: "a size".into(),
                })
            }
            Some(v) => {
                self.map.insert(key.into(), v);
                self.take_u64(key)
            }
            None => Ok(None),
        }
    }

    /// One of `choices`.
    pub fn take_enum(
        &mut self,
        key: &str,
        choices: &[&str],
    ) -> Result<Option<String>, OptionsError> {
        match self.take_str(key)? {
            Some(v) if choices.contains(&v.as_str()) => Ok(Some(v)),
            Some(_) => Err(OptionsError::Value {
                param: self.param(key),
                expected: format!("one of {}", choices.join(", ")),
            }),
            None => Ok(None),
        }
    }

    /// A nested group of options (`cache` in `cache.direct`).
    pub fn take_group(&mut self, key: &str) -> Result<Option<Options>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v) => Self::object(v, self.param(key) + ".", self.strings).map(Some),
        }
    }

    /// A child: a node name, inline options, or null.
    pub fn take_child(&mut self, key: &str) -> Result<Option<ChildOption>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(ChildOption::Null)),
            Some(Value::String(s)) => Ok(Some(ChildOption::Reference(s))),
            Some(v @ Value::Object(_)) => Self::object(v, self.param(key) + ".", self.strings)
                .map(|o| Some(ChildOption::Inline(o))),
            Some(_) => Err(self.type_error(key, "node name or object")),
        }
    }

    /// A list of children (`children` of quorum).
    pub fn take_children(&mut self, key: &str) -> Result<Option<Vec<ChildOption>>, OptionsError> {
        let list = match self.map.remove(key) {
            None => return Ok(None),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(self.type_error(key, "array")),
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, v) in list.into_iter().enumerate() {
            let mut one = Options {
                map: Map::from_iter([(i.to_string(), v)]),
                prefix: self.param(key) + ".",
                strings: self.strings,
            };
            out.push(one.take_child(&i.to_string())?.expect("just inserted"));
        }
        Ok(Some(out))
    }

    /// A list of option groups (`inject-error` of blkdebug).
    pub fn take_groups(&mut self, key: &str) -> Result<Option<Vec<Options>>, OptionsError> {
        let list = match self.map.remove(key) {
            None => return Ok(None),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(self.type_error(key, "array")),
        };
        list.into_iter()
            .enumerate()
            .map(|(i, v)| Self::object(v, format!("{}{i}.", self.param(key) + "."), self.strings))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A value that must be there.
    pub fn required<T>(&self, key: &str, value: Option<T>) -> Result<T, OptionsError> {
        value.ok_or_else(|| OptionsError::Missing {
            param: self.param(key),
        })
    }

    /// Fails on any option nobody took.
    pub fn finish(self) -> Result<(), OptionsError> {
        match self.map.keys().next() {
            Some(k) => Err(OptionsError::Unknown {
                param: self.param(k),
            }),
            None => Ok(()),
        }
    }
}

/// Parses `1024`, `512K`, `1G`... (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return None,
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_types_are_strict() {
        let mut o = Options::from_json(json!({"size": "1G", "read-zeroes": "on", "n": 3})).unwrap();
        assert_eq!(
            o.take_size("size").unwrap_err().to_string(),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            o.take_bool("read-zeroes").unwrap_err().to_string(),
            "Invalid parameter type for 'read-zeroes', expected: boolean"
        );
        assert_eq!(o.take_u64("n").unwrap(), Some(3));
    }

    #[test]
    fn keyval_strings_are_parsed() {
        let mut o =
            Options::from_keyval(json!({"size": "1G", "ro": "on", "n": "12", "bad": "x"})).unwrap();
        assert_eq!(o.take_size("size").unwrap(), Some(1 << 30));
        assert_eq!(o.take_bool("ro").unwrap(), Some(true));
        assert_eq!(o.take_u64("n").unwrap(), Some(12));
        assert_eq!(
            o.take_bool("bad").unwrap_err().to_string(),
            "Parameter 'bad' expects 'on' or 'off'"
        );
    }

    #[test]
    fn nested_names_carry_their_path() {
        let mut o = Options::from_json(json!({"file": {"driver": "file", "oops": 1}})).unwrap();
        let Some(ChildOption::Inline(mut f)) = o.take_child("file").unwrap() else {
            panic!("inline child")
        };
        assert_eq!(f.take_str("driver").unwrap().as_deref(), Some("file"));
        assert_eq!(
            f.required("filename", None::<String>)
                .unwrap_err()
                .to_string(),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            f.finish().unwrap_err().to_string(),
            "Parameter 'file.oops' is unexpected"
        );
    }

    #[test]
    fn children_may_be_names_objects_or_null() {
        let mut o =
            Options::from_json(json!({"children": ["a", {"driver": "null-co"}], "backing": null}))
                .unwrap();
        let kids = o.take_children("children").unwrap().unwrap();
        assert!(matches!(&kids[0], ChildOption::Reference(n) if n == "a"));
        assert!(matches!(&kids[1], ChildOption::Inline(_)));
        assert!(matches!(
            o.take_child("backing").unwrap(),
            Some(ChildOption::Null)
        ));
        assert_eq!(o.take_enum("x", &["a"]).unwrap(), None);
        o.finish().unwrap();
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("99999999999P"), None);
    }
}
