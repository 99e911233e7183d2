//! The OpenAPI document, generated from the route table so it covers every route, and the
//! Swagger UI served from assets compiled into the binary (no download at build or run
//! time). Both are exposed only with `ENV=dev`, as in Open WebUI.

use std::sync::Arc;

use bytes::Bytes;
use utoipa::openapi::path::{HttpMethod, OperationBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder, Paths,
    Ref, ResponseBuilder,
};

use crate::forms;
use crate::http::router::{Access, Endpoint, ROUTES};

/// Body of `POST /api/chat/completions` (OpenAI's shape plus Open WebUI's fields; any other
/// OpenAI field is forwarded unchanged).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ChatCompletionRequest {
    /// A model id from `/api/models`.
    pub model: String,
    /// OpenAI chat messages.
    pub messages: Vec<serde_json::Value>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Model parameters, merged into the body as Open WebUI does.
    pub params: Option<serde_json::Value>,
}

/// Everything `/docs` needs.
pub struct Docs {
    pub openapi_json: Bytes,
    pub swagger: Arc<utoipa_swagger_ui::Config<'static>>,
}

fn body_schema(endpoint: Endpoint) -> Option<&'static str> {
    Some(match endpoint {
        Endpoint::Signup => "SignupForm",
        Endpoint::Signin => "SigninForm",
        Endpoint::AddUser => "AddUserForm",
        Endpoint::CreateApiKey => "ApiKeyForm",
        Endpoint::ChatCompletions => "ChatCompletionRequest",
        Endpoint::KnowledgeCreate | Endpoint::KnowledgeUpdate => "KnowledgeForm",
        Endpoint::KnowledgeFileAdd | Endpoint::KnowledgeFileRemove => "FileIdForm",
        // Issue 13: user administration, self-service accounts, retrieval API.
        Endpoint::UserUpdate => "UserUpdateForm",
        Endpoint::UpdatePassword => "UpdatePasswordForm",
        Endpoint::UpdateProfile => "UpdateProfileForm",
        Endpoint::RetrievalQueryDoc => "QueryDocForm",
        Endpoint::RetrievalQueryCollection => "QueryCollectionsForm",
        Endpoint::RetrievalProcessText => "ProcessTextForm",
        Endpoint::PresetCreate | Endpoint::PresetUpdate => "PresetForm",
        _ => return None,
    })
}

fn method(m: &http::Method) -> HttpMethod {
    match *m {
        http::Method::POST => HttpMethod::Post,
        http::Method::DELETE => HttpMethod::Delete,
        http::Method::HEAD => HttpMethod::Head,
        http::Method::PUT => HttpMethod::Put,
        _ => HttpMethod::Get,
    }
}

/// Builds the document from [`ROUTES`].
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for r in ROUTES {
        let mut op = OperationBuilder::new()
            .summary(Some(r.summary))
            .tag(r.group.as_str())
            .operation_id(Some(format!(
                "{}_{}",
                r.method.as_str().to_lowercase(),
                r.path.trim_matches('/').replace(['/', '.'], "_")
            )))
            .response("200", ResponseBuilder::new().description("Success").build());
        let access = match r.access {
            Access::Public => "No credential needed.",
            Access::Session => "Any signed-in user (pending included).",
            Access::Verified => "Role user or admin.",
            Access::Admin => "Admin only.",
        };
        op = op.description(Some(access));
        if r.access != Access::Public {
            op = op
                .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
                .security(SecurityRequirement::new(
                    "api_key_header",
                    Vec::<String>::new(),
                ))
                .response(
                    "401",
                    ResponseBuilder::new()
                        .description("Missing, invalid or insufficient credential")
                        .build(),
                );
        }
        if r.endpoint == Endpoint::FileUpload {
            let form = ObjectBuilder::new()
                .property(
                    "file",
                    ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String)
                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                            utoipa::openapi::KnownFormat::Binary,
                        ))),
                )
                .property(
                    "metadata",
                    ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String),
                )
                .required("file")
                .build();
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "multipart/form-data",
                        ContentBuilder::new().schema(Some(form)).build(),
                    )
                    .required(Some(utoipa::openapi::Required::True))
                    .build(),
            ));
        } else if r.method == http::Method::POST {
            let content = match body_schema(r.endpoint) {
                Some(name) => ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(name)))
                    .build(),
                None => ContentBuilder::new()
                    .schema(Some(ObjectBuilder::new().build()))
                    .build(),
            };
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", content)
                    .required(Some(if r.endpoint == Endpoint::CreateApiKey {
                        utoipa::openapi::Required::False
                    } else {
                        utoipa::openapi::Required::True
                    }))
                    .build(),
            ));
        }
        let mut path = r.path.to_string();
        if r.prefix {
            path.push_str("/{file}");
        }
        paths.add_path_operation(&path, vec![method(&r.method)], op.build());
        if r.url_idx {
            let with_idx = format!("{}/{{url_idx}}", r.path.trim_end_matches('/'));
            let op = OperationBuilder::new()
                .summary(Some(format!("{} (one connection by index)", r.summary)))
                .tag(r.group.as_str())
                .description(Some(access))
                .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
                .parameter(
                    utoipa::openapi::path::ParameterBuilder::new()
                        .name("url_idx")
                        .parameter_in(utoipa::openapi::path::ParameterIn::Path)
                        .required(utoipa::openapi::Required::True)
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(utoipa::openapi::schema::Type::Integer),
                        )),
                )
                .response("200", ResponseBuilder::new().description("Success").build())
                .build();
            paths.add_path_operation(&with_idx, vec![method(&r.method)], op);
        }
    }
    let components = ComponentsBuilder::new()
        .security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        )
        .security_scheme(
            "api_key_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        )
        .schema_from::<forms::SignupForm>()
        .schema_from::<forms::SigninForm>()
        .schema_from::<forms::AddUserForm>()
        .schema_from::<forms::ApiKeyForm>()
        .schema_from::<ChatCompletionRequest>()
        .schema_from::<forms::KnowledgeForm>()
        .schema_from::<forms::GrantForm>()
        .schema_from::<forms::FileIdForm>()
        .schema_from::<forms::UserUpdateForm>()
        .schema_from::<forms::UpdatePasswordForm>()
        .schema_from::<forms::UpdateProfileForm>()
        .schema_from::<forms::QueryDocForm>()
        .schema_from::<forms::QueryCollectionsForm>()
        .schema_from::<forms::ProcessTextForm>()
        .schema_from::<crate::forms::preset::PresetForm>()
        .schema_from::<crate::forms::preset::PresetGrantForm>()
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("ragway")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Open WebUI-compatible gateway for Ollama and OpenAI-compatible servers",
                )),
        )
        .paths(paths)
        .components(Some(components))
        .build()
}

pub fn docs() -> Docs {
    let json = document().to_json().expect("OpenAPI serialises");
    Docs {
        openapi_json: Bytes::from(json),
        swagger: Arc::new(utoipa_swagger_ui::Config::from("/openapi.json")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented() {
        let v: serde_json::Value = serde_json::from_slice(&super::docs().openapi_json).unwrap();
        for r in crate::http::router::ROUTES {
            let mut p = r.path.to_string();
            if r.prefix {
                p.push_str("/{file}");
            }
            let m = r.method.as_str().to_lowercase();
            assert!(v["paths"][&p][&m].is_object(), "{m} {p} missing");
        }
        assert!(v["components"]["schemas"]["SignupForm"].is_object());
    }
}
