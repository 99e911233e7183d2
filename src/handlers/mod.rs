//! Route handlers. Each takes the matched route and returns an [`Outcome`]; none writes
//! to the session except to read the request body.

pub(crate) mod auths;
use crate::auth::access;
mod chat;
mod errors;
mod files;
mod knowledge;
mod models;
mod ollama;
mod presets;
mod retrieval;
mod system;
mod usage;
pub(crate) mod users;

use crate::app::App;
use crate::error::ApiError;
use crate::http::router::{Endpoint, RouteSpec};
use crate::http::{Reply, Session};
use crate::request::{Plan, RequestCtx};

/// What the gateway should do with a request.
pub enum Outcome {
    /// Answer locally.
    Reply(Reply),
    /// Forward through the forward engine.
    Forward(Plan),
    /// A local answer written incrementally.
    Stream(Streamer),
}

/// Local answers too long-lived or too large to build in memory.
pub enum Streamer {
    /// Server-sent events with a file's processing status until it is final.
    FileStatus(String),
    /// A stored blob, read from disk in chunks.
    File {
        path: std::path::PathBuf,
        content_type: String,
        disposition: String,
    },
}

impl Streamer {
    /// Writes the whole response; returns its status.
    pub async fn write(self, app: &App, session: &mut Session) -> pingora::Result<u16> {
        match self {
            Streamer::FileStatus(id) => files::stream_status(app, session, &id).await,
            Streamer::File {
                path,
                content_type,
                disposition,
            } => crate::http::send_file(session, &path, &content_type, &disposition).await,
        }
    }
}

/// The matched route of a request.
pub struct Req {
    pub route: &'static RouteSpec,
    pub url_idx: Option<usize>,
    /// Sub-path under a prefix route (`/docs/...`).
    pub tail: String,
    /// `{param}` values of the path.
    pub params: Vec<String>,
}

impl Req {
    /// The first path parameter (`{id}`).
    pub fn id(&self) -> &str {
        self.params.first().map(String::as_str).unwrap_or_default()
    }
}

pub type HandlerResult = Result<Outcome, ApiError>;

/// Dispatches on the endpoint.
pub async fn handle(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &Req,
) -> HandlerResult {
    use Endpoint::*;
    match req.route.endpoint {
        Health => system::health(),
        HealthDb => system::health_db(app).await,
        Ready => system::ready(app).await,
        Version => system::version(),
        Docs => system::docs(app, session, &req.tail),
        OpenApi => system::openapi(app),
        Signup => auths::signup(app, session).await,
        Signin => auths::signin(app, session).await,
        SessionUser => auths::session_user(app, session, ctx),
        Signout => auths::signout(app, ctx).await,
        AddUser => auths::add_user(app, session).await,
        CreateApiKey => auths::create_api_key(app, session, ctx).await,
        GetApiKey => auths::get_api_key(app, ctx).await,
        DeleteApiKey => auths::delete_api_key(app, ctx).await,
        Models => models::list(app, session, ctx).await,
        ChatCompletions => chat::completions(app, session, ctx).await,
        OllamaStatus => Ok(Outcome::Reply(Reply::ok(
            &serde_json::json!({"status": true}),
        ))),
        OllamaTags => ollama::tags(app, ctx, req).await,
        OllamaPs => ollama::ps(app).await,
        OllamaVersion => ollama::version(app, session, req).await,
        OllamaUnload => ollama::unload(app, session, ctx).await,
        OllamaPull | OllamaCreate => ollama::admin_stream(app, session, req),
        OllamaPush | OllamaCopy | OllamaDelete => {
            ollama::admin_model_op(app, session, ctx, req).await
        }
        OllamaV1Models => ollama::v1_models(app, ctx, req).await,
        OllamaShow
        | OllamaEmbed
        | OllamaEmbeddings
        | OllamaGenerate
        | OllamaChat
        | OllamaV1Completions
        | OllamaV1ChatCompletions
        | OllamaV1Messages
        | OllamaV1Responses => ollama::model_route(app, session, ctx, req).await,
        FileUpload => files::upload(app, session, ctx).await,
        FileList => files::list(app, session, ctx).await,
        FileGet => files::get(app, ctx, req).await,
        FileStatus => files::status(app, session, ctx, req).await,
        FileDataContent => files::data_content(app, ctx, req).await,
        FileContent => files::content(app, session, ctx, req).await,
        FileDelete => files::delete(app, ctx, req).await,
        KnowledgeCreate => knowledge::create(app, session, ctx).await,
        KnowledgeList => knowledge::list(app, session, ctx).await,
        KnowledgeGet => knowledge::get(app, ctx, req).await,
        KnowledgeFiles => knowledge::files(app, session, ctx, req).await,
        KnowledgeUpdate => knowledge::update(app, session, ctx, req).await,
        KnowledgeFileAdd => knowledge::add_file(app, session, ctx, req).await,
        KnowledgeFileRemove => knowledge::remove_file(app, session, ctx, req).await,
        KnowledgeReset => knowledge::reset(app, ctx, req).await,
        KnowledgeDelete => knowledge::delete(app, ctx, req).await,
        // User administration, self-service accounts and the retrieval API (issue 13).
        UserList => users::list(app, session).await,
        UserAll => users::all(app).await,
        UserGet => users::get(app, req).await,
        UserUpdate => users::update(app, session, ctx, req).await,
        UserDelete => users::delete(app, ctx, req).await,
        UpdatePassword => auths::update_password(app, session, ctx).await,
        UpdateProfile => auths::update_profile(app, session, ctx).await,
        RetrievalQueryDoc => retrieval::query_doc(app, session, ctx).await,
        RetrievalQueryCollection => retrieval::query_collection(app, session, ctx).await,
        RetrievalProcessText => retrieval::process_text(app, session, ctx).await,
        KnowledgeBatchAdd => knowledge::batch_add(app, session, ctx, req).await,
        // The web page (issue 13).
        UiIndex => crate::ui::serve("").map(Outcome::Reply),
        UiAsset => crate::ui::serve(&req.tail).map(Outcome::Reply),
        // Limits and usage metering.
        Usage => usage::list(app, session, ctx).await,
        UsageLimits => usage::get_limits(app, req.id()).await,
        SetUsageLimits => usage::set_limits(app, session, req.id()).await,
        // Model presets.
        PresetCreate => presets::create(app, session, ctx).await,
        PresetListAll => presets::list_all(app, ctx).await,
        PresetList => presets::list(app, session, ctx).await,
        PresetGet => presets::get(app, session, ctx).await,
        PresetUpdate => presets::update(app, session, ctx).await,
        PresetDelete => presets::delete(app, session, ctx).await,
        PresetToggle => presets::toggle(app, session, ctx).await,
    }
}

/// The identity of an authenticated route (the router guarantees one is present).
fn identity(ctx: &RequestCtx) -> Result<&crate::auth::Identity, ApiError> {
    ctx.identity
        .as_ref()
        .ok_or_else(|| ApiError::unauthorized(crate::error::msg::NOT_AUTHENTICATED))
}

/// Request path's query string.
fn query(session: &Session) -> Option<String> {
    session.req_header().uri.query().map(String::from)
}
