//! The daemons' configuration files: the first byte picks the daemon (even: torii-dataplane's
//! TOML, `Config::parse` with every check; odd: torii-vhost-user-blk's, `settings::parse`), the
//! rest is the file's text. Properties: a clear error or a configuration, never a panic; a
//! configuration that parsed passes its checks again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if which & 1 == 0 {
        if let Ok(cfg) = torii_dataplane::config::Config::parse(text) {
            assert!(cfg.validate().is_ok());
        }
    } else if let Ok(s) = torii_vhost_user_blk::settings::parse(text) {
        for e in &s.exports {
            assert!(e.validate().is_ok());
        }
    }
});
