//! Paths as Go's `http.ServeMux` reads them. It redirects a path that is
//! not clean (`//health`, `/v0//token/autojoin`, `/a/../health`) to its
//! clean form before it looks for a route, and it matches each segment
//! unescaped (`/%68ealth` is `/health`). Without this, a path Go serves
//! would be a 404 here.

use axum::extract::Request;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse as _, Response};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// What Go's `url.URL.String` escapes in a path: everything but letters,
/// digits and `-_.~$&+,/:;=@`.
const PATH_ESCAPES: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'!')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The redirect for a request whose path is not clean, or `None` when it is.
pub(super) fn redirect_unclean(request: &Request) -> Option<Response> {
    // Go cleans the path as sent, so an encoded slash (`/%2Fhealth`) is part
    // of a segment, not a separator: clean, and then not found.
    let raw = request.uri().path();
    if clean_path(raw) == raw {
        return None;
    }
    let decoded = percent_decode_str(raw).decode_utf8_lossy();
    let clean = clean_path(&decoded);
    let mut location = utf8_percent_encode(&clean, PATH_ESCAPES).to_string();
    if let Some(query) = request.uri().query().filter(|q| !q.is_empty()) {
        location.push('?');
        location.push_str(query);
    }
    Some(moved_permanently(request.method(), &location))
}

/// Gives a request whose path spells one of ours with escaped characters
/// (`/%68ealth`, `/v0/token/%69ntegration`) that route's path, so the
/// router, the log and the metrics all see the route. RFC 3986 makes an
/// escaped unreserved character the same as the character, and Go's router
/// agrees. An escaped slash stays inside its segment (`/%2Fhealth` is one
/// segment, `/health`, and matches nothing), as in Go.
pub(super) fn route_by_unescaped_path<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    let uri = request.uri();
    if !uri.path().contains('%') {
        return request;
    }
    let Some(route) = unescaped_route(uri.path()) else {
        return request;
    };
    let target = match uri.query() {
        Some(query) => format!("{route}?{query}"),
        None => route.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    // A route and a query the request already carried: always valid.
    parts.path_and_query = PathAndQuery::try_from(target).ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// The route whose segments are those of `path` once each is unescaped.
fn unescaped_route(path: &str) -> Option<&'static str> {
    super::observe::ROUTES.iter().copied().find(|route| {
        let mut sent = path.split('/');
        let mut wanted = route.split('/');
        loop {
            match (sent.next(), wanted.next()) {
                (None, None) => return true,
                (Some(sent), Some(wanted)) if percent_decode_str(sent).eq(wanted.bytes()) => {}
                _ => return false,
            }
        }
    })
}

/// Go's `http.Redirect` with 301: a small HTML body for GET, the content
/// type without a body for HEAD, neither for other methods.
fn moved_permanently(method: &Method, location: &str) -> Response {
    let body = if method == Method::GET {
        format!("<a href=\"{}\">Moved Permanently</a>.\n\n", html_escape(location))
    } else {
        String::new()
    };
    let mut response = (StatusCode::MOVED_PERMANENTLY, body).into_response();
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    if method == Method::GET || method == Method::HEAD {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
    }
    // The location is made of escaped path bytes and the request's own
    // (already valid) query, so it is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, value);
    }
    response
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out
}

/// Go's `cleanPath`: `path.Clean` of the path made absolute, keeping a
/// trailing slash.
fn clean_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    let mut clean = String::with_capacity(path.len());
    for part in &parts {
        clean.push('/');
        clean.push_str(part);
    }
    if clean.is_empty() || path.ends_with('/') {
        clean.push('/');
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_as_go_cleans_them() {
        for (path, clean) in [
            ("/health", "/health"),
            ("/", "/"),
            ("", "/"),
            ("//health", "/health"),
            ("/v0//token/autojoin", "/v0/token/autojoin"),
            ("/a/../health", "/health"),
            ("/./health", "/health"),
            ("/../health", "/health"),
            ("/..", "/"),
            ("/health/", "/health/"),
            ("/health//", "/health/"),
            ("/a/b/../../.well-known/jwks.json", "/.well-known/jwks.json"),
            ("/a/./", "/a/"),
            ("health", "/health"),
        ] {
            assert_eq!(clean_path(path), clean, "{path:?}");
        }
    }

    #[test]
    fn escaped_segments_name_a_route_only_when_each_unescapes_to_its_segment() {
        for (path, route) in [
            ("/%68ealth", Some("/health")),
            ("/%68%65%61%6C%74%68", Some("/health")),
            ("/v0/token/%69ntegration", Some("/v0/token/integration")),
            ("/v0/token%2Fintegration", None),
            ("/%2Ewell-known/jwks%2Ejson", Some("/.well-known/jwks.json")),
            ("/%2Fhealth", None),
            ("/health%2F", None),
            ("/%68ealth/", None),
            ("/x/%68ealth", None),
            ("/%2E%2E/health", None),
            ("/%zzhealth", None),
            ("/", None),
        ] {
            assert_eq!(unescaped_route(path), route, "{path:?}");
        }
    }

    #[test]
    fn a_rewritten_target_keeps_its_query_and_an_unknown_one_is_left_alone() {
        let rewrite = |target: &str| {
            let request = Request::builder().uri(target).body(()).unwrap();
            route_by_unescaped_path(request).uri().to_string()
        };
        assert_eq!(rewrite("/%68ealth?a=%41"), "/health?a=%41");
        assert_eq!(rewrite("http://t/%68ealth"), "http://t/health");
        assert_eq!(rewrite("/%2Fhealth?x"), "/%2Fhealth?x");
        assert_eq!(rewrite("/health"), "/health");
    }

    #[test]
    fn locations_are_escaped_as_go_escapes_them() {
        let escape = |p: &str| utf8_percent_encode(p, PATH_ESCAPES).to_string();
        assert_eq!(escape("/a b/c?d"), "/a%20b/c%3Fd");
        assert_eq!(escape("/$&+,:;=@-_.~"), "/$&+,:;=@-_.~");
        assert_eq!(escape("/é"), "/%C3%A9");
        assert_eq!(html_escape("/a?b=<c>&d"), "/a?b=&lt;c&gt;&amp;d");
    }
}
