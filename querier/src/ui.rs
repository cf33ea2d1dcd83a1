//! The web UI: HTML, CSS and JavaScript modules embedded in the binary and served at
//! `/` (the page) and `/ui/…` (its assets), by every process that serves the query
//! API. The UI reads only the query API, on the same origin; its Content Security
//! Policy forbids every other host. See `docs/ui.md`.
//!
//! `LOUPE_UI_DIR=querier/ui` serves the files from that directory instead, read on
//! every request, for working on the UI without rebuilding.

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
pub struct Asset {
    /// Path under `querier/ui/`.
    pub path: &'static str,
    pub body: &'static str,
}

macro_rules! assets {
    ($($path:literal),* $(,)?) => {
        &[$(Asset { path: $path, body: include_str!(concat!("../ui/", $path)) }),*]
    };
}

/// Every file of the UI (a test checks that the list matches `querier/ui/`).
pub const ASSETS: &[Asset] = assets![
    "index.html",
    "style.css",
    "trace.css",
    "pages.css",
    "js/main.js",
    "js/core.js",
    "js/charts.js",
    "js/traces.js",
    "js/trace.js",
    "js/compare.js",
    "js/sessions.js",
    "js/dashboard.js",
    "js/login.js",
];

/// Same origin only: no script, style, image, font or request goes anywhere else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// The UI's routes: `/` and `/ui/{path}`.
pub fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>, h: HeaderMap| async move { serve(&path, &h) }),
        )
}

fn dev_dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("LOUPE_UI_DIR").map(PathBuf::from))
        .as_ref()
}

/// ETags of the embedded files: the build's version and a hash of the content.
fn etag(asset: &Asset) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    asset.body.hash(&mut h);
    format!("\"{}-{:016x}\"", env!("CARGO_PKG_VERSION"), h.finish())
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let (body, tag) = if let Some(dir) = dev_dir() {
        // Only names of the embedded list, so no path leaves the directory.
        if !ASSETS.iter().any(|a| a.path == path) {
            return not_found(path);
        }
        match std::fs::read_to_string(dir.join(path)) {
            Ok(text) => (text, None),
            Err(_) => return not_found(path),
        }
    } else {
        let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
            return not_found(path);
        };
        let tag = etag(asset);
        if headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == tag)
        {
            return with_headers(StatusCode::NOT_MODIFIED.into_response(), path, Some(&tag));
        }
        (asset.body.to_owned(), Some(tag))
    };
    with_headers(body.into_response(), path, tag.as_deref())
}

fn with_headers(mut response: Response, path: &str, tag: Option<&str>) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidated on every load (cheap: 304 while the binary is the same).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(tag) = tag.and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert(header::ETAG, tag);
    }
    response
}

fn not_found(path: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("no UI file {path:?}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_on_disk() -> Vec<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(&root).unwrap().to_string_lossy();
                    out.push(rel.replace('\\', "/"));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn every_file_of_the_ui_is_embedded_and_nothing_else() {
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.path.to_owned()).collect();
        embedded.sort();
        assert_eq!(embedded, files_on_disk());
    }

    #[test]
    fn no_asset_refers_to_another_host() {
        let url = regex::Regex::new(
            r#"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}|@import|url\(\s*['"]?https?:"#,
        )
        .unwrap();
        for a in ASSETS {
            for (i, line) in a.body.lines().enumerate() {
                // Comments in JS and CSS may contain `//`; a host needs a dot and a TLD.
                // The SVG namespace is a name, not a request.
                let line = line.replace("'http://www.w3.org/2000/svg'", "");
                if let Some(m) = url.find(&line) {
                    panic!("{}:{}: refers to {:?}: {line}", a.path, i + 1, m.as_str());
                }
            }
        }
    }

    #[test]
    fn every_module_the_page_imports_is_embedded() {
        let import = regex::Regex::new(r#"(?m)^\s*import\s.*?from\s+['"]\./([^'"]+)['"]"#).unwrap();
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            for c in import.captures_iter(a.body) {
                let target = format!("js/{}", &c[1]);
                assert!(
                    ASSETS.iter().any(|b| b.path == target),
                    "{} imports {target}, which is not embedded",
                    a.path
                );
            }
        }
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_with_a_same_origin_policy() {
        use tower::ServiceExt;
        let app = router();
        let get = |uri: &str, etag: Option<&str>| {
            let mut req = axum::http::Request::get(uri);
            if let Some(t) = etag {
                req = req.header(header::IF_NONE_MATCH, t);
            }
            req.body(axum::body::Body::empty()).unwrap()
        };
        let page = app.clone().oneshot(get("/", None)).await.unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(
            page.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        let tag = page.headers()[header::ETAG].to_str().unwrap().to_owned();
        let again = app.clone().oneshot(get("/", Some(&tag))).await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let js = app
            .clone()
            .oneshot(get("/ui/js/main.js", None))
            .await
            .unwrap();
        assert_eq!(
            js.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let missing = app.oneshot(get("/ui/../Cargo.toml", None)).await.unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }
}
