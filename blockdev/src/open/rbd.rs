//! `driver=rbd`'s options, as QEMU spells them: `pool`, `namespace`,
//! `image`, `snapshot`, `conf`, `user`, `key-secret` (a `secret` object
//! holding the cephx key), `auth-client-required` and `server` (monitors,
//! overriding the conf's).

use strata_formats::rbd::RbdOptions;

use super::{BlockdevError, Common, OpenContext};
use crate::options::{Options, OptionsError};

fn invalid(msg: String) -> BlockdevError {
    BlockdevError::Options(OptionsError::Invalid(msg))
}

/// Parses the options of an `rbd` node.
pub(super) fn options(
    o: &mut Options,
    ctx: &OpenContext,
    common: &Common,
) -> Result<RbdOptions, BlockdevError> {
    let pool = o.take_str("pool")?;
    let pool = o.required("pool", pool)?;
    let image = o.take_str("image")?;
    let image = o.required("image", image)?;
    if o.has("encrypt") {
        return Err(BlockdevError::NotSupported("rbd's 'encrypt' option".into()));
    }
    let key = match o.take_str("key-secret")? {
        Some(id) => Some(
            ctx.secrets
                .base64(&id)
                .map_err(|e| invalid(format!("key-secret: {e}")))?,
        ),
        None => None,
    };
    // QEMU takes a list (cephx, none), tried in order; librados takes the
    // same list as one string.
    let auth = match o.take("auth-client-required") {
        None => None,
        Some(serde_json::Value::Array(modes)) => {
            let mut out = Vec::new();
            for (i, m) in modes.iter().enumerate() {
                match m.as_str() {
                    Some(s @ ("cephx" | "none")) => out.push(s),
                    _ => {
                        return Err(invalid(format!(
                            "auth-client-required.{i} must be 'cephx' or 'none', not {m}"
                        )))
                    }
                }
            }
            Some(out.join(";"))
        }
        Some(other) => {
            return Err(invalid(format!(
                "auth-client-required must be a list of 'cephx' and 'none', not {other}"
            )))
        }
    };
    let mut servers = Vec::new();
    for mut s in o.take_groups("server")?.unwrap_or_default() {
        let host = s.take_str("host")?;
        let host = s.required("host", host)?;
        let port = s.take_str("port")?.unwrap_or_else(|| "6789".into());
        if port.parse::<u16>().is_err() {
            return Err(invalid(format!(
                "server port '{port}' is not a port number"
            )));
        }
        s.finish()?;
        servers.push(if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        });
    }
    Ok(RbdOptions {
        pool,
        namespace: o.take_str("namespace")?.filter(|n| !n.is_empty()),
        image,
        snapshot: o.take_str("snapshot")?,
        conf: o.take_str("conf")?.map(Into::into),
        user: o.take_str("user")?,
        key,
        auth_client_required: auth,
        servers,
        conf_options: Vec::new(),
        read_only: common.driver_read_only(),
        discard: common.discard,
        cache: !common.direct,
        no_flush: common.no_flush,
    })
}
