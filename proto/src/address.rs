//! The one reading of a peer address: `host:port` or a full URL, as given on
//! a command line, in a config or by a registering agent, becomes the URL a
//! gRPC channel dials (plain `http://` unless a scheme is given). The CLI, the
//! agent and the coordinator all dial through it so they agree.

/// `addr` trimmed, with `http://` in front unless it already has a scheme.
pub fn endpoint_url(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::endpoint_url;

    #[test]
    fn a_bare_address_gets_http_and_a_url_is_kept() {
        assert_eq!(endpoint_url("127.0.0.1:7700"), "http://127.0.0.1:7700");
        assert_eq!(endpoint_url(" node-1:7800 \n"), "http://node-1:7800");
        assert_eq!(endpoint_url("https://coord.example:443"), "https://coord.example:443");
        assert_eq!(endpoint_url("http://[::1]:7700"), "http://[::1]:7700");
    }
}
