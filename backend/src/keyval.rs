//! QEMU's command-line option syntax: `a=1,b.c=x,,y` (a comma in a value
//! is doubled), or a JSON object when the argument starts with `{`.
//! Dotted keys nest; objects whose keys are 0, 1, 2... become lists.
//! Scalars stay strings: the consumer parses them (see `Options`).

use serde_json::{Map, Value};

/// A malformed option string.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyvalError {
    /// `key` without `=value`.
    #[error("Expected '=' after parameter '{0}'")]
    NoValue(String),
    /// A key segment that is empty or has odd characters.
    #[error("Invalid parameter '{0}'")]
    BadKey(String),
    /// The same key twice, or a key used both as a value and a group.
    #[error("Parameter '{0}' is set more than once, or used both as a value and a group")]
    Conflict(String),
    /// A list with a gap (`x.0` and `x.2` but no `x.1`).
    #[error("Parameter '{0}' is missing")]
    ListGap(String),
    /// `{...}` that is not a JSON object.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Parses `arg`. A first element without `=` is the value of
/// `implied_key` (`socket,id=x` for `--chardev`), when there is one.
pub fn parse(arg: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    if arg.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(arg).map_err(|e| KeyvalError::Json(e.to_string()))?;
        if !v.is_object() {
            return Err(KeyvalError::Json("not an object".into()));
        }
        return Ok(v);
    }
    let mut root = Map::new();
    for (i, elem) in split(arg).into_iter().enumerate() {
        if elem.is_empty() {
            continue;
        }
        let (key, value) = match elem.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match implied_key {
                Some(k) if i == 0 => (k.to_owned(), elem),
                _ => return Err(KeyvalError::NoValue(elem)),
            },
        };
        insert(&mut root, &key, value)?;
    }
    listify(Value::Object(root), "")
}

/// Splits on single commas; a doubled comma is a literal one.
fn split(arg: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), KeyvalError> {
    let segments: Vec<&str> = key.split('.').collect();
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !segments.iter().all(|s| valid(s)) {
        return Err(KeyvalError::BadKey(key.into()));
    }
    let conflict = || KeyvalError::Conflict(key.into());
    let mut map = root;
    for seg in &segments[..segments.len() - 1] {
        let entry = map
            .entry(seg.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        map = entry.as_object_mut().ok_or_else(conflict)?;
    }
    let last = segments[segments.len() - 1];
    if map.contains_key(last) {
        return Err(conflict());
    }
    map.insert(last.into(), Value::String(value));
    Ok(())
}

/// Turns objects keyed 0..n into lists, recursively.
fn listify(v: Value, path: &str) -> Result<Value, KeyvalError> {
    let Value::Object(map) = v else { return Ok(v) };
    let numeric = !map.is_empty() && map.keys().all(|k| k.chars().all(|c| c.is_ascii_digit()));
    let child_path = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    if numeric {
        let mut items: Vec<(usize, Value)> = Vec::new();
        for (k, v) in map {
            let i = k.parse().map_err(|_| KeyvalError::BadKey(child_path(&k)))?;
            items.push((i, listify(v, &child_path(&k))?));
        }
        items.sort_by_key(|(i, _)| *i);
        for (want, (i, _)) in items.iter().enumerate() {
            if *i != want {
                return Err(KeyvalError::ListGap(child_path(&want.to_string())));
            }
        }
        return Ok(Value::Array(items.into_iter().map(|(_, v)| v).collect()));
    }
    let mut out = Map::new();
    for (k, v) in map {
        let v = listify(v, &child_path(&k))?;
        out.insert(k, v);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn dotted_keys_nest_and_lists_form() {
        let v = parse(
            "driver=quorum,node-name=q,vote-threshold=2,children.0.driver=file,children.0.filename=a,,b,children.1=n1",
            None,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"driver": "quorum", "node-name": "q", "vote-threshold": "2",
                   "children": [{"driver": "file", "filename": "a,b"}, "n1"]})
        );
    }

    #[test]
    fn implied_keys_and_json() {
        assert_eq!(
            parse(
                "socket,id=m0,path=/tmp/q.sock,server=on,wait=off",
                Some("backend")
            )
            .unwrap(),
            json!({"backend": "socket", "id": "m0", "path": "/tmp/q.sock", "server": "on", "wait": "off"})
        );
        assert_eq!(
            parse(r#"{"driver": "null-co", "size": 512}"#, None).unwrap(),
            json!({"driver": "null-co", "size": 512})
        );
        assert_eq!(
            parse("driver=file,filename=x=y", None).unwrap()["filename"],
            "x=y"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            parse("driver=file,ro", None).unwrap_err().to_string(),
            "Expected '=' after parameter 'ro'"
        );
        assert_eq!(
            parse("a=1,a=2", None).unwrap_err(),
            KeyvalError::Conflict("a".into())
        );
        assert_eq!(
            parse("a=1,a.b=2", None).unwrap_err(),
            KeyvalError::Conflict("a.b".into())
        );
        assert_eq!(
            parse("x.0=a,x.2=b", None).unwrap_err().to_string(),
            "Parameter 'x.1' is missing"
        );
        assert_eq!(
            parse("a..b=1", None).unwrap_err(),
            KeyvalError::BadKey("a..b".into())
        );
        assert!(matches!(parse("{oops", None), Err(KeyvalError::Json(_))));
        assert!(matches!(parse("[1]", None), Err(KeyvalError::NoValue(_))));
    }
}
