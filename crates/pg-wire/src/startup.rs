//! A StartupMessage's parameters, and its `options` as the server reads them.

use crate::frame::{FrameError, take_cstring};

/// The parameters of a StartupMessage, after its protocol version: name/value pairs in
/// order, up to the empty name that ends them.
pub fn params(mut body: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstring(&mut body)?;
        if name.is_empty() {
            return Ok(params);
        }
        let value = take_cstring(&mut body)?;
        params.push((name, value));
    }
}

/// `pg_split_opts`: the words of an `options` parameter, split at unescaped whitespace,
/// `\x` standing for `x`.
pub fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The settings an `options` parameter gives, as the server applies them: `-c name=value`,
/// `-cname=value` and `--name=value`, dashes in a name read as underscores. Other words are
/// left out.
pub fn option_settings(options: &str) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    let words = split_options(options);
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next().map(String::as_str)
        } else {
            word.strip_prefix("-c").or_else(|| word.strip_prefix("--"))
        };
        if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_as_the_server_reads_them() {
        assert_eq!(
            option_settings(
                r"-c search_path=p_1,public -cstatement_timeout=5s --lock-timeout=1s -c x=a\ b -v"
            ),
            [
                ("search_path", "p_1,public"),
                ("statement_timeout", "5s"),
                ("lock_timeout", "1s"),
                ("x", "a b"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        assert_eq!(split_options("  a\\  b  "), ["a ", "b"]);
    }

    #[test]
    fn a_startup_message_s_parameters_end_at_an_empty_name() {
        assert_eq!(
            params(b"user\0app\0database\0db\0\0").unwrap(),
            [("user", "app"), ("database", "db")].map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        assert!(params(b"user\0app").is_err());
    }
}
