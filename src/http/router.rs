//! The route table: every HTTP route ragway answers, with its access level.
//!
//! The table is the single source for dispatch and for the OpenAPI document, so the docs
//! cannot miss a route. Matching ignores a trailing slash; routes marked `url_idx` also
//! match with a `/{url_idx}` suffix selecting one Ollama upstream, as in Open WebUI.

use http::Method;

/// Who may call a route (Open WebUI's dependency levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credential needed.
    Public,
    /// Any signed-in user, `pending` included (`get_current_user`).
    Session,
    /// `user` or `admin` (`get_verified_user`).
    Verified,
    /// `admin` only.
    Admin,
}

/// Route family, used as the `group` label of metrics and as the OpenAPI tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    System,
    Auth,
    Models,
    Chat,
    Ollama,
    Files,
    Knowledge,
    /// The web page (issue 13).
    Ui,
    /// Limits and usage metering.
    Usage,
}

impl Group {
    /// Every group, in declaration order ([`Group::index`]).
    pub const ALL: [Group; 9] = [
        Group::System,
        Group::Auth,
        Group::Models,
        Group::Chat,
        Group::Ollama,
        Group::Files,
        Group::Knowledge,
        Group::Ui,
        Group::Usage,
    ];

    /// The position in [`Group::ALL`].
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Group::System => "system",
            Group::Auth => "auth",
            Group::Models => "models",
            Group::Chat => "chat",
            Group::Ollama => "ollama",
            Group::Files => "files",
            Group::Knowledge => "knowledge",
            Group::Ui => "ui",
            Group::Usage => "usage",
        }
    }
}

/// What a route does; dispatch matches on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    HealthDb,
    Ready,
    Version,
    Docs,
    OpenApi,
    Signup,
    Signin,
    SessionUser,
    Signout,
    AddUser,
    CreateApiKey,
    GetApiKey,
    DeleteApiKey,
    Models,
    ChatCompletions,
    OllamaStatus,
    OllamaTags,
    OllamaPs,
    OllamaVersion,
    OllamaUnload,
    OllamaPull,
    OllamaPush,
    OllamaCreate,
    OllamaCopy,
    OllamaDelete,
    OllamaShow,
    OllamaEmbed,
    OllamaEmbeddings,
    OllamaGenerate,
    OllamaChat,
    OllamaV1Completions,
    OllamaV1ChatCompletions,
    OllamaV1Messages,
    OllamaV1Responses,
    OllamaV1Models,
    FileUpload,
    FileList,
    FileGet,
    FileStatus,
    FileDataContent,
    FileContent,
    FileDelete,
    KnowledgeCreate,
    KnowledgeList,
    KnowledgeGet,
    KnowledgeFiles,
    KnowledgeUpdate,
    KnowledgeFileAdd,
    KnowledgeFileRemove,
    KnowledgeReset,
    KnowledgeDelete,
    // User administration, self-service accounts and the retrieval API (issue 13).
    UserList,
    UserAll,
    UserGet,
    UserUpdate,
    UserDelete,
    UpdatePassword,
    UpdateProfile,
    RetrievalQueryDoc,
    RetrievalQueryCollection,
    RetrievalProcessText,
    KnowledgeBatchAdd,
    // The web page (issue 13): its HTML at `/` and `/ui/`, assets under `/ui/`.
    UiIndex,
    UiAsset,
    // Limits and usage metering.
    Usage,
    UsageLimits,
    SetUsageLimits,
    // Model presets (src/presets, src/handlers/presets.rs).
    PresetCreate,
    PresetListAll,
    PresetList,
    PresetGet,
    PresetUpdate,
    PresetDelete,
    PresetToggle,
}

/// One row of the route table.
#[derive(Debug)]
pub struct RouteSpec {
    pub method: Method,
    /// Canonical path as documented (Open WebUI's spelling).
    pub path: &'static str,
    pub endpoint: Endpoint,
    pub access: Access,
    pub group: Group,
    /// Also matches `path/{url_idx}`.
    pub url_idx: bool,
    /// Also matches any sub-path (static files under `/docs/`).
    pub prefix: bool,
    pub summary: &'static str,
}

macro_rules! routes {
    ($( $m:ident $path:literal => $ep:ident, $acc:ident, $grp:ident, $idx:literal, $pre:literal, $sum:literal; )*) => {
        /// Every route, in documentation order.
        pub static ROUTES: &[RouteSpec] = &[$(
            RouteSpec {
                method: Method::$m,
                path: $path,
                endpoint: Endpoint::$ep,
                access: Access::$acc,
                group: Group::$grp,
                url_idx: $idx,
                prefix: $pre,
                summary: $sum,
            },
        )*];
    };
}

routes! {
    GET "/health" => Health, Public, System, false, false, "Liveness: always {\"status\":true}";
    GET "/health/db" => HealthDb, Public, System, false, false, "Database health";
    GET "/ready" => Ready, Public, System, false, false, "Readiness: store open and an upstream reachable";
    GET "/api/version" => Version, Public, System, false, false, "Open WebUI API version implemented";
    GET "/docs" => Docs, Public, System, false, true, "Swagger UI (ENV=dev only)";
    GET "/openapi.json" => OpenApi, Public, System, false, false, "OpenAPI document (ENV=dev only)";
    POST "/api/v1/auths/signup" => Signup, Public, Auth, false, false, "Create an account (first user becomes admin)";
    POST "/api/v1/auths/signin" => Signin, Public, Auth, false, false, "Sign in with email and password";
    GET "/api/v1/auths/" => SessionUser, Session, Auth, false, false, "The signed-in user";
    POST "/api/v1/auths/signout" => Signout, Session, Auth, false, false, "Revoke the current token";
    POST "/api/v1/auths/add" => AddUser, Admin, Auth, false, false, "Create a user (admin)";
    POST "/api/v1/auths/api_key" => CreateApiKey, Session, Auth, false, false, "Create or replace your API key (shown once)";
    GET "/api/v1/auths/api_key" => GetApiKey, Session, Auth, false, false, "Your API key's prefix and metadata";
    DELETE "/api/v1/auths/api_key" => DeleteApiKey, Session, Auth, false, false, "Delete your API key";
    GET "/api/models" => Models, Verified, Models, false, false, "All models of all upstreams";
    GET "/api/v1/models" => Models, Verified, Models, false, false, "Alias of /api/models";
    POST "/api/chat/completions" => ChatCompletions, Verified, Chat, false, false, "OpenAI-compatible chat completion";
    POST "/api/v1/chat/completions" => ChatCompletions, Verified, Chat, false, false, "Alias of /api/chat/completions";
    GET "/ollama/" => OllamaStatus, Public, Ollama, false, false, "Ollama proxy status";
    HEAD "/ollama/" => OllamaStatus, Public, Ollama, false, false, "Ollama proxy status";
    GET "/ollama/api/tags" => OllamaTags, Verified, Ollama, true, false, "Merged model list (or one upstream's)";
    GET "/ollama/api/ps" => OllamaPs, Admin, Ollama, false, false, "Merged running models";
    GET "/ollama/api/version" => OllamaVersion, Public, Ollama, true, false, "Lowest Ollama version across upstreams";
    POST "/ollama/api/unload" => OllamaUnload, Admin, Ollama, false, false, "Unload a model on every upstream hosting it";
    POST "/ollama/api/pull" => OllamaPull, Admin, Ollama, true, false, "Pull a model (streamed)";
    DELETE "/ollama/api/push" => OllamaPush, Admin, Ollama, true, false, "Push a model (streamed)";
    POST "/ollama/api/create" => OllamaCreate, Admin, Ollama, true, false, "Create a model (streamed)";
    POST "/ollama/api/copy" => OllamaCopy, Admin, Ollama, true, false, "Copy a model";
    DELETE "/ollama/api/delete" => OllamaDelete, Admin, Ollama, true, false, "Delete a model";
    POST "/ollama/api/show" => OllamaShow, Verified, Ollama, false, false, "Show model information";
    POST "/ollama/api/embed" => OllamaEmbed, Verified, Ollama, true, false, "Embeddings";
    POST "/ollama/api/embeddings" => OllamaEmbeddings, Verified, Ollama, true, false, "Embeddings (legacy)";
    POST "/ollama/api/generate" => OllamaGenerate, Verified, Ollama, true, false, "Generate (streamed NDJSON)";
    POST "/ollama/api/chat" => OllamaChat, Verified, Ollama, true, false, "Chat (streamed NDJSON)";
    POST "/ollama/v1/completions" => OllamaV1Completions, Verified, Ollama, true, false, "OpenAI-compatible completions";
    POST "/ollama/v1/chat/completions" => OllamaV1ChatCompletions, Verified, Ollama, true, false, "OpenAI-compatible chat completions";
    POST "/ollama/v1/messages" => OllamaV1Messages, Verified, Ollama, true, false, "Anthropic-compatible messages";
    POST "/ollama/v1/responses" => OllamaV1Responses, Verified, Ollama, true, false, "OpenAI Responses API";
    GET "/ollama/v1/models" => OllamaV1Models, Verified, Ollama, true, false, "Ollama models in OpenAI list format";
    POST "/api/v1/files/" => FileUpload, Verified, Files, false, false, "Upload a file (multipart field `file`) and process it";
    GET "/api/v1/files/" => FileList, Verified, Files, false, false, "Files you can read, newest first (paginated)";
    GET "/api/v1/files/{id}" => FileGet, Verified, Files, false, false, "A file with its extracted content";
    GET "/api/v1/files/{id}/process/status" => FileStatus, Verified, Files, false, false, "Processing status (?stream=true for SSE)";
    GET "/api/v1/files/{id}/data/content" => FileDataContent, Verified, Files, false, false, "Extracted text";
    GET "/api/v1/files/{id}/content" => FileContent, Verified, Files, false, false, "The uploaded bytes";
    DELETE "/api/v1/files/{id}" => FileDelete, Verified, Files, false, false, "Delete a file, its chunks and vectors everywhere";
    POST "/api/v1/knowledge/create" => KnowledgeCreate, Verified, Knowledge, false, false, "Create a knowledge collection";
    GET "/api/v1/knowledge/" => KnowledgeList, Verified, Knowledge, false, false, "Collections you can read (paginated)";
    GET "/api/v1/knowledge/{id}" => KnowledgeGet, Verified, Knowledge, false, false, "A collection";
    GET "/api/v1/knowledge/{id}/files" => KnowledgeFiles, Verified, Knowledge, false, false, "Files of a collection (paginated)";
    POST "/api/v1/knowledge/{id}/update" => KnowledgeUpdate, Verified, Knowledge, false, false, "Rename, describe or re-share a collection";
    POST "/api/v1/knowledge/{id}/file/add" => KnowledgeFileAdd, Verified, Knowledge, false, false, "Add a processed file (no re-embedding)";
    POST "/api/v1/knowledge/{id}/file/remove" => KnowledgeFileRemove, Verified, Knowledge, false, false, "Remove a file (?delete_file=true deletes it too)";
    POST "/api/v1/knowledge/{id}/reset" => KnowledgeReset, Verified, Knowledge, false, false, "Remove every file from a collection";
    DELETE "/api/v1/knowledge/{id}/delete" => KnowledgeDelete, Verified, Knowledge, false, false, "Delete a collection";
    // User administration, self-service accounts and the retrieval API (issue 13).
    GET "/api/v1/users/" => UserList, Admin, Auth, false, false, "Users, 30 per page (?query=&order_by=&direction=&page=)";
    GET "/api/v1/users/all" => UserAll, Admin, Auth, false, false, "Every user";
    GET "/api/v1/users/{id}" => UserGet, Verified, Auth, false, false, "A user's name and picture";
    POST "/api/v1/users/{id}/update" => UserUpdate, Admin, Auth, false, false, "Approve, change role, rename, change email or reset password";
    DELETE "/api/v1/users/{id}" => UserDelete, Admin, Auth, false, false, "Delete a user with their keys, sessions, files and collections";
    POST "/api/v1/auths/update/password" => UpdatePassword, Session, Auth, false, false, "Change your password (ends your other sessions)";
    POST "/api/v1/auths/update/profile" => UpdateProfile, Session, Auth, false, false, "Change your name and picture";
    POST "/api/v1/retrieval/query/doc" => RetrievalQueryDoc, Verified, Knowledge, false, false, "Search one file (file-{id}) or collection";
    POST "/api/v1/retrieval/query/collection" => RetrievalQueryCollection, Verified, Knowledge, false, false, "Search several files or collections, merged";
    POST "/api/v1/retrieval/process/text" => RetrievalProcessText, Verified, Knowledge, false, false, "Store and process a text (optionally into a collection)";
    POST "/api/v1/knowledge/{id}/files/batch/add" => KnowledgeBatchAdd, Verified, Knowledge, false, false, "Add several files; each file's outcome in one answer";
    // The web page (issue 13). It signs in through the public API like any client.
    GET "/" => UiIndex, Public, Ui, false, false, "The web page";
    GET "/ui" => UiAsset, Public, Ui, false, true, "The web page and its embedded assets";
    // Limits and usage metering.
    GET "/api/v1/usage" => Usage, Verified, Usage, false, false, "Token usage by user, key and model (?user_id, key_prefix, model, since, until)";
    GET "/api/v1/usage/limits/{id}" => UsageLimits, Admin, Usage, false, false, "A user's and their API key's limits (admin)";
    POST "/api/v1/usage/limits/{id}" => SetUsageLimits, Admin, Usage, false, false, "Set a user's and/or their API key's limits (admin)";
    // Model presets: Open WebUI's workspace models (ids are query parameters, as there).
    POST "/api/v1/models/create" => PresetCreate, Verified, Models, false, false, "Create a model preset (Open WebUI's model form)";
    GET "/api/v1/models/" => PresetListAll, Verified, Models, false, false, "Model presets you can read, as one list (Open WebUI ≤0.6)";
    GET "/api/v1/models/list" => PresetList, Verified, Models, false, false, "Model presets you can read (paginated, Open WebUI 0.10)";
    GET "/api/v1/models/model" => PresetGet, Verified, Models, false, false, "A model preset (?id=)";
    POST "/api/v1/models/model/update" => PresetUpdate, Verified, Models, false, false, "Update a model preset (?id=)";
    DELETE "/api/v1/models/model/delete" => PresetDelete, Verified, Models, false, false, "Delete a model preset (?id=)";
    POST "/api/v1/models/model/toggle" => PresetToggle, Verified, Models, false, false, "Turn a model preset on or off (?id=)";
}

/// Paths where a trailing slash matters: Open WebUI serves the model list at
/// `/api/v1/models` and (≤0.6) its workspace models at `/api/v1/models/`.
const SLASH_SENSITIVE: &[&str] = &["/api/v1/models/"];

/// The result of matching a request line.
#[derive(Debug)]
pub enum Match {
    Found {
        route: &'static RouteSpec,
        /// The `/{url_idx}` suffix, when given.
        url_idx: Option<usize>,
        /// The rest of the path under a `prefix` route.
        tail: String,
        /// Values of `{param}` segments, in order.
        params: Vec<String>,
    },
    /// The path exists with other methods.
    MethodNotAllowed(Vec<&'static str>),
    NotFound,
}

fn trim(p: &str) -> &str {
    if p.len() > 1 {
        p.trim_end_matches('/')
    } else {
        p
    }
}

/// Matches `{param}` segments; returns their values, or `None` when the path differs.
fn match_template(template: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) if ts.starts_with('{') && ts.ends_with('}') => {
                if ps.is_empty() {
                    return None;
                }
                params.push(ps.to_string());
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// Per path, the answers of [`scan`] for each method a route gives it, memoised: most
/// requests name a route exactly, and scanning the ~100 rows for one cost as much as parsing
/// its head. Built by running `scan` itself, so a memoised answer cannot differ from a
/// scanned one.
// foldhash: the map is built once from the route table; a request's path is only looked up.
type Exact = foldhash::HashMap<&'static str, Vec<(Method, &'static RouteSpec)>>;

static EXACT: std::sync::LazyLock<Exact> = std::sync::LazyLock::new(|| {
    let mut exact = Exact::default();
    for r in ROUTES {
        let path = trim(r.path);
        if SLASH_SENSITIVE.contains(&path) {
            continue;
        }
        if let Match::Found {
            route,
            url_idx: None,
            tail,
            params,
        } = scan(&r.method, path)
            && tail.is_empty()
            && params.is_empty()
        {
            let methods = exact.entry(path).or_default();
            if !methods.iter().any(|(m, _)| *m == r.method) {
                methods.push((r.method.clone(), route));
            }
        }
    }
    exact
});

/// Finds the route for `method` and `path` (without query).
pub fn find(method: &Method, path: &str) -> Match {
    if !SLASH_SENSITIVE.contains(&path)
        && let Some(methods) = EXACT.get(trim(path))
        && let Some((_, route)) = methods.iter().find(|(m, _)| m == method)
    {
        return Match::Found {
            route,
            url_idx: None,
            tail: String::new(),
            params: Vec::new(),
        };
    }
    scan(method, path)
}

/// Matches `path` against every row in order: the first row that matches wins.
fn scan(method: &Method, path: &str) -> Match {
    if SLASH_SENSITIVE.contains(&path) {
        let routes = ROUTES.iter().filter(|r| r.path == path);
        let mut allowed: Vec<&'static str> = Vec::new();
        for route in routes {
            if route.method == method || (route.method == Method::GET && method == Method::HEAD) {
                return Match::Found {
                    route,
                    url_idx: None,
                    tail: String::new(),
                    params: Vec::new(),
                };
            }
            allowed.push(route.method.as_str());
        }
        return Match::MethodNotAllowed(allowed);
    }
    let path = trim(path);
    let mut allowed: Vec<&'static str> = Vec::new();
    for route in ROUTES.iter().filter(|r| !SLASH_SENSITIVE.contains(&r.path)) {
        let base = trim(route.path);
        if base.contains('{') {
            let Some(params) = match_template(base, path) else {
                continue;
            };
            if route.method == method {
                return Match::Found {
                    route,
                    url_idx: None,
                    tail: String::new(),
                    params,
                };
            }
            allowed.push(route.method.as_str());
            continue;
        }
        let (hit, url_idx, tail) = if path == base {
            (true, None, String::new())
        } else if let Some(rest) = path.strip_prefix(base).and_then(|r| r.strip_prefix('/')) {
            if route.url_idx {
                match rest.parse::<usize>() {
                    Ok(i) if !rest.contains('/') => (true, Some(i), String::new()),
                    _ => (false, None, String::new()),
                }
            } else if route.prefix {
                (true, None, rest.to_string())
            } else {
                (false, None, String::new())
            }
        } else {
            (false, None, String::new())
        };
        if !hit {
            continue;
        }
        let method_ok =
            route.method == method || (route.method == Method::GET && method == Method::HEAD);
        if method_ok {
            return Match::Found {
                route,
                url_idx,
                tail,
                params: Vec::new(),
            };
        }
        allowed.push(route.method.as_str());
    }
    if allowed.is_empty() {
        Match::NotFound
    } else {
        allowed.sort_unstable();
        allowed.dedup();
        Match::MethodNotAllowed(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memoised_answers_are_the_scanned_ones() {
        assert!(EXACT.len() > ROUTES.len() / 2, "most routes are exact");
        let memoised = EXACT
            .iter()
            .flat_map(|(path, methods)| methods.iter().map(move |(m, r)| (m, path, r)));
        for (method, path, route) in memoised {
            // With a trailing slash too, which is where `SLASH_SENSITIVE` paths part ways.
            for (p, exact) in [((*path).to_string(), true), (format!("{path}/"), false)] {
                let (found, scanned) = (find(method, &p), scan(method, &p));
                assert_eq!(format!("{found:?}"), format!("{scanned:?}"), "{method} {p}");
                if exact {
                    assert!(
                        matches!(found, Match::Found { route: a, .. } if std::ptr::eq(a, *route)),
                        "{method} {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_documented_route_is_reachable() {
        for r in ROUTES {
            let concrete = r.path.replace("{id}", "abc");
            match find(&r.method, &concrete) {
                Match::Found { route, .. } => assert_eq!(route.endpoint, r.endpoint, "{}", r.path),
                other => panic!("{} {} does not match: {other:?}", r.method, r.path),
            }
            if r.url_idx {
                let p = format!("{}/1", trim(r.path));
                match find(&r.method, &p) {
                    Match::Found { url_idx, .. } => assert_eq!(url_idx, Some(1)),
                    other => panic!("{p}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn trailing_slash_methods_and_unknowns() {
        assert!(matches!(
            find(&Method::GET, "/api/v1/auths"),
            Match::Found { .. }
        ));
        assert!(matches!(
            find(&Method::HEAD, "/health"),
            Match::Found { .. }
        ));
        match find(&Method::GET, "/api/chat/completions") {
            Match::MethodNotAllowed(m) => assert_eq!(m, vec!["POST"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(find(&Method::GET, "/nope"), Match::NotFound));
        assert!(matches!(
            find(&Method::GET, "/ollama/api/tags/x"),
            Match::NotFound
        ));
        match find(&Method::GET, "/api/v1/knowledge/k1/files") {
            Match::Found { route, params, .. } => {
                assert_eq!(route.endpoint, Endpoint::KnowledgeFiles);
                assert_eq!(params, vec!["k1".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(find(&Method::POST, "/api/v1/knowledge/create"), Match::Found { route, .. } if route.endpoint == Endpoint::KnowledgeCreate)
        );
        assert!(matches!(
            find(&Method::PUT, "/api/v1/files/x"),
            Match::MethodNotAllowed(_)
        ));
        match find(&Method::GET, "/api/v1/models/") {
            Match::Found { route, .. } => assert_eq!(route.endpoint, Endpoint::PresetListAll),
            other => panic!("{other:?}"),
        }
        match find(&Method::GET, "/api/v1/models") {
            Match::Found { route, .. } => assert_eq!(route.endpoint, Endpoint::Models),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            find(&Method::POST, "/api/v1/models/"),
            Match::MethodNotAllowed(_)
        ));
        match find(&Method::GET, "/docs/swagger-ui.css") {
            Match::Found { tail, .. } => assert_eq!(tail, "swagger-ui.css"),
            other => panic!("{other:?}"),
        }
    }
}
