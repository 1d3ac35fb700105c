//! qemu-img's spelling of an RBD image as one string:
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:OPTION=VALUE...]`, where `conf`
//! names a ceph.conf, `id` the client, and any other option is a Ceph
//! option; a backslash escapes the next character.

use super::RbdOptions;

/// Splits `s` at every unescaped `sep`, removing the escapes.
fn split(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    parts.last_mut().expect("one part").push(n);
                }
            }
            c if c == sep => parts.push(String::new()),
            c => parts.last_mut().expect("one part").push(c),
        }
    }
    parts
}

/// Parses an `rbd:` name; the error says what is wrong with it.
pub fn parse(name: &str) -> Result<RbdOptions, String> {
    let Some(rest) = name.strip_prefix("rbd:") else {
        return Err(format!("'{name}' does not start with rbd:"));
    };
    // The image part ends at the first unescaped ':'.
    let mut image_part = String::new();
    let mut opts_part = "";
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ':' {
            opts_part = &rest[i + 1..];
            break;
        }
        image_part.push(c);
    }
    let (path, snapshot) = match split(&image_part, '@').as_slice() {
        [p] => (p.clone(), None),
        [p, s] if !s.is_empty() => (p.clone(), Some(s.clone())),
        _ => {
            return Err(format!(
                "'{name}': the snapshot after '@' is empty or repeated"
            ))
        }
    };
    let mut o = match split(&path, '/').as_slice() {
        [pool, image] => RbdOptions {
            pool: pool.clone(),
            image: image.clone(),
            ..Default::default()
        },
        [pool, ns, image] => RbdOptions {
            pool: pool.clone(),
            namespace: Some(ns.clone()),
            image: image.clone(),
            ..Default::default()
        },
        _ => {
            return Err(format!(
                "'{name}' is not rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:OPTION=VALUE...]"
            ))
        }
    };
    if o.pool.is_empty() || o.image.is_empty() {
        return Err(format!("'{name}': the pool and the image must be named"));
    }
    o.snapshot = snapshot;
    o.read_only = o.snapshot.is_some();
    if !opts_part.is_empty() {
        for kv in split(opts_part, ':') {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("'{name}': option '{kv}' is not OPTION=VALUE"));
            };
            match k {
                "conf" => o.conf = Some(v.into()),
                "id" => o.user = Some(v.into()),
                _ => o.conf_options.push((k.into(), v.into())),
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_qemu_img_spells_them() {
        let o = parse("rbd:rbd/vm1").unwrap();
        assert_eq!((o.pool.as_str(), o.image.as_str()), ("rbd", "vm1"));
        assert!(o.snapshot.is_none() && !o.read_only);

        let o =
            parse("rbd:pool/ns/img@snap:conf=/etc/ceph/c.conf:id=virt:mon_host=10.0.0.1\\:6789")
                .unwrap();
        assert_eq!(o.namespace.as_deref(), Some("ns"));
        assert_eq!(o.snapshot.as_deref(), Some("snap"));
        assert!(o.read_only);
        assert_eq!(
            o.conf.as_deref(),
            Some(std::path::Path::new("/etc/ceph/c.conf"))
        );
        assert_eq!(o.user.as_deref(), Some("virt"));
        assert_eq!(
            o.conf_options,
            [("mon_host".to_owned(), "10.0.0.1:6789".to_owned())]
        );
    }

    #[test]
    fn malformed_names_say_what_is_wrong() {
        for (bad, want) in [
            ("rbd:onlypool", "rbd:POOL"),
            ("rbd:/img", "must be named"),
            ("rbd:p/i@", "snapshot"),
            ("rbd:p/i:novalue", "not OPTION=VALUE"),
            ("file:x", "does not start with rbd:"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
