//! `#[pgharness::test]`: a test function whose parameters are filled from the test's own
//! migrated schema, by type. Use it through the `pgharness` crate, which re-exports it and
//! holds the runtime side (`pgharness::Inject`, `pgharness::__macro`); this crate only
//! rewrites the function.
//!
//! ```ignore
//! #[pgharness::test(fixtures("users"))]
//! async fn lists_users(pool: deadpool_postgres::Pool) -> Result<(), MyError> { … }
//! ```
//!
//! becomes a plain `#[test]` that builds a current-thread runtime, claims the schema (with
//! the arguments as `TestDb::builder` options), fills each parameter, runs the body, closes
//! what it handed out, and finishes the schema, kept when the body panicked or returned
//! `Err`. A parameter of type `TestDb` gets the test's database itself, borrowed mutably for
//! the body (the schema is finished after the body returns, once its outcome is known).

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, LitStr, Meta, Pat, Token, Type};

/// What the attribute's arguments ask for, as `#[sqlx::test]` spells them.
#[derive(Default)]
struct Args {
    /// `fixtures("a", "b")`: `fixtures/a.sql`, `fixtures/b.sql` next to the test's source
    /// file, in order; a name ending in `.sql` is a path from that file.
    fixtures: Vec<LitStr>,
    /// `fixtures(path = "dir", scripts("a", "b"))`: `dir/a.sql`, `dir/b.sql` instead.
    fixtures_path: Option<LitStr>,
    /// `migrations = "dir"` (relative to the crate), `migrations = false`,
    /// `migrator = "path::TO::MIGRATOR"` (an embedded sqlx `Migrator`), or
    /// `sea_orm_migrator = "path::Migrator"` (a type implementing sea-orm's `MigratorTrait`),
    /// or `migrate_with = "path::to::migrate"` (an async function of the connection string
    /// into the new schema, returning a `Result` whose error displays).
    migrations: Option<Migrations>,
    /// `migrations_version = "3"`: what code migrations are pooled by (change it when they
    /// change); without it, each build of the test binary has a pool of its own.
    version: Option<LitStr>,
}

enum Migrations {
    Dir(LitStr),
    None,
    Migrator(syn::Path, LitStr),
    SeaOrm(syn::Path),
    Function(syn::Path, LitStr),
}

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut args = Args::default();
        let metas = Punctuated::<Meta, Token![,]>::parse_terminated(input)?;
        for meta in metas {
            match &meta {
                Meta::List(list) if list.path.is_ident("fixtures") => {
                    let inner =
                        list.parse_args_with(Punctuated::<Expr, Token![,]>::parse_terminated)?;
                    for expr in inner {
                        match expr {
                            Expr::Lit(ExprLit {
                                lit: Lit::Str(name),
                                ..
                            }) => args.fixtures.push(name),
                            Expr::Assign(assign) if path_is(&assign.left, "path") => {
                                args.fixtures_path = Some(string(&assign.right)?);
                            }
                            Expr::Call(call) if path_is(&call.func, "scripts") => {
                                for arg in &call.args {
                                    args.fixtures.push(string(arg)?);
                                }
                            }
                            other => {
                                return Err(syn::Error::new(
                                    other.span(),
                                    "expected fixture names (`fixtures(\"users\", \"todos\")`) or `fixtures(path = \"dir\", scripts(\"users\"))`",
                                ));
                            }
                        }
                    }
                }
                Meta::NameValue(pair) if pair.path.is_ident("migrations") => {
                    args.migrations = Some(match &pair.value {
                        Expr::Lit(ExprLit {
                            lit: Lit::Str(dir), ..
                        }) => Migrations::Dir(dir.clone()),
                        Expr::Lit(ExprLit {
                            lit: Lit::Bool(b), ..
                        }) if !b.value => Migrations::None,
                        other => {
                            return Err(syn::Error::new(
                                other.span(),
                                "expected `migrations = \"dir\"` (relative to the crate) or `migrations = false`",
                            ));
                        }
                    });
                }
                Meta::NameValue(pair) if pair.path.is_ident("migrator") => {
                    // As `#[sqlx::test]`: a string naming the static (`"crate::MIGRATOR"`).
                    let text = match &pair.value {
                        Expr::Lit(ExprLit {
                            lit: Lit::Str(text),
                            ..
                        }) => text.clone(),
                        other => {
                            return Err(syn::Error::new(
                                other.span(),
                                "expected `migrator = \"path::TO::MIGRATOR\"` (a string naming a static sqlx `Migrator`)",
                            ));
                        }
                    };
                    let path = text.parse::<syn::Path>().map_err(|_| {
                        syn::Error::new(text.span(), "expected the path of a static sqlx `Migrator`, e.g. `\"crate::MIGRATOR\"`")
                    })?;
                    args.migrations = Some(Migrations::Migrator(path, text));
                }
                Meta::NameValue(pair) if pair.path.is_ident("sea_orm_migrator") => {
                    let text = string(&pair.value).map_err(|_| {
                        syn::Error::new(pair.value.span(), "expected `sea_orm_migrator = \"path::Migrator\"` (a string naming a type implementing sea-orm's `MigratorTrait`)")
                    })?;
                    let path = text.parse::<syn::Path>().map_err(|_| {
                        syn::Error::new(text.span(), "expected the path of a type implementing sea-orm's `MigratorTrait`, e.g. `\"migration::Migrator\"`")
                    })?;
                    args.migrations = Some(Migrations::SeaOrm(path));
                }
                Meta::NameValue(pair) if pair.path.is_ident("migrate_with") => {
                    let text = string(&pair.value).map_err(|_| {
                        syn::Error::new(pair.value.span(), "expected `migrate_with = \"path::to::migrate\"` (a string naming an async fn taking the connection string into the new schema)")
                    })?;
                    let path = text.parse::<syn::Path>().map_err(|_| {
                        syn::Error::new(text.span(), "expected the path of an async migration function, e.g. `\"crate::migrate\"`")
                    })?;
                    args.migrations = Some(Migrations::Function(path, text));
                }
                Meta::NameValue(pair) if pair.path.is_ident("migrations_version") => {
                    args.version = Some(string(&pair.value).map_err(|_| {
                        syn::Error::new(pair.value.span(), "expected `migrations_version = \"…\"` (what code migrations are pooled by)")
                    })?);
                }
                other => {
                    return Err(syn::Error::new(
                        other.span(),
                        "unknown argument; #[pgharness::test] takes `fixtures(…)`, `migrations = …`, `migrator = …`, `sea_orm_migrator = …`, `migrate_with = …` and `migrations_version = …`",
                    ));
                }
            }
        }
        if let Some(version) = &args.version
            && !matches!(
                args.migrations,
                Some(Migrations::SeaOrm(_) | Migrations::Function(..))
            )
        {
            return Err(syn::Error::new(
                version.span(),
                "`migrations_version` keys migrations written in code: it goes with `sea_orm_migrator = …` or `migrate_with = …`",
            ));
        }
        Ok(args)
    }
}

fn path_is(expr: &Expr, name: &str) -> bool {
    matches!(expr, Expr::Path(path) if path.path.is_ident(name))
}

fn string(expr: &Expr) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s.clone()),
        other => Err(syn::Error::new(other.span(), "expected a string literal")),
    }
}

/// Whether a parameter's type is `TestDb` (any path ending in it).
fn is_test_db(ty: &Type) -> bool {
    matches!(ty, Type::Path(path) if path.qself.is_none()
        && path.path.segments.last().is_some_and(|s| s.ident == "TestDb" && s.arguments.is_none()))
}

/// Runs a test with its own migrated Postgres schema; see the `pgharness` crate.
#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(attr as Args);
    let function = syn::parse_macro_input!(item as ItemFn);
    match expand(args, function) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

fn expand(args: Args, function: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "#[pgharness::test] needs an `async fn`",
        ));
    }
    let name = &sig.ident;
    let output = &sig.output;
    let mut inner_params = Vec::new();
    let mut fills = Vec::new();
    let mut call_args = Vec::new();
    let mut test_db_params = 0;
    for (index, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(typed) = input else {
            return Err(syn::Error::new(input.span(), "a test takes no `self`"));
        };
        let pat = &typed.pat;
        if !matches!(&**pat, Pat::Ident(_) | Pat::Wild(_)) {
            return Err(syn::Error::new(
                pat.span(),
                "name the parameter (`pool: PgPool`)",
            ));
        }
        let ty = &typed.ty;
        if is_test_db(ty) {
            test_db_params += 1;
            if test_db_params > 1 {
                return Err(syn::Error::new(ty.span(), "one `TestDb` parameter at most"));
            }
            inner_params.push(quote!(#pat: &mut #ty));
            call_args.push(quote!(&mut __pgharness_db));
        } else {
            let value = format_ident!("__pgharness_arg{index}");
            inner_params.push(quote!(#pat: #ty));
            fills.push(quote_spanned! {ty.span()=>
                let #value = <#ty as ::pgharness::Inject>::inject(&__pgharness_db, &mut __pgharness_closers).await;
            });
            call_args.push(quote!(#value));
        }
    }
    let mut builder = quote!(::pgharness::TestDb::builder());
    match &args.migrations {
        Some(Migrations::Dir(dir)) => {
            builder = quote!(#builder.migrations(::std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(#dir)));
        }
        Some(Migrations::None) => builder = quote!(#builder.without_migrations()),
        // An sqlx 0.8 or 0.9 `Migrator` (pgharness's `sqlx` or `sqlx09` feature), or a
        // `LazyLock` of one: a method call derefs to it.
        Some(Migrations::Migrator(path, text)) => {
            builder = quote!({
                use ::pgharness::__macro::SqlxMigrator as _;
                #path.pgharness_apply(#builder, concat!(module_path!(), ": ", #text))
            });
        }
        // `sea_orm_migrator` needs pgharness's `sea-orm` feature.
        Some(Migrations::SeaOrm(path)) => {
            let version = args
                .version
                .clone()
                .unwrap_or_else(|| LitStr::new("", Span::call_site()));
            builder = quote!(#builder.sea_orm_migrator::<#path>(#version));
        }
        // A function of the user's: pooled by its path and the version (or the build).
        Some(Migrations::Function(path, text)) => {
            let version = args
                .version
                .clone()
                .unwrap_or_else(|| LitStr::new("", Span::call_site()));
            builder = quote!(#builder.migrate_with(
                concat!("migrate_with ", module_path!(), ": ", #text),
                #version,
                |url: ::std::string::String| #path(url),
            ));
        }
        None => {}
    }
    // As `#[sqlx::test]`: embedded with `include_str!`, so found next to the test's
    // source file, and a change to one rebuilds the test.
    let dir = args
        .fixtures_path
        .as_ref()
        .map_or_else(|| "fixtures".to_owned(), LitStr::value);
    for name in &args.fixtures {
        let value = name.value();
        let path = if value.ends_with(".sql") {
            value
        } else {
            format!("{}/{value}.sql", dir.trim_end_matches('/'))
        };
        let path = LitStr::new(&path, name.span());
        builder = quote!(#builder.fixture_sql(#path, include_str!(#path)));
    }
    // A test that cannot reach its `TestDb` lends the control session to its first sqlx
    // connection (pgharness's `lend`).
    let closers = if test_db_params == 0 {
        quote!(::pgharness::__macro::Closers::lending())
    } else {
        quote!(::pgharness::__macro::Closers::default())
    };
    let inner = format_ident!("__pgharness_{}", name, span = Span::call_site());
    Ok(quote! {
        #[::core::prelude::v1::test]
        #(#attrs)*
        #vis fn #name() {
            async fn #inner(#(#inner_params),*) #output #block
            ::pgharness::__macro::runtime().block_on(async {
                let mut __pgharness_db = ::pgharness::__macro::database(#builder).await;
                let mut __pgharness_closers = #closers;
                #(#fills)*
                let __pgharness_outcome = #inner(#(#call_args),*).await;
                __pgharness_closers.close().await;
                ::pgharness::__macro::finish(__pgharness_db, __pgharness_outcome);
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{Args, expand};
    use syn::ItemFn;

    fn expand_str(attr: &str, item: &str) -> Result<String, String> {
        let args: Args = syn::parse_str(attr).map_err(|e| e.to_string())?;
        let function: ItemFn = syn::parse_str(item).map_err(|e| e.to_string())?;
        expand(args, function)
            .map(|tokens| tokens.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sqlx_test_arguments_become_builder_options() {
        let out = expand_str(
            r#"migrations = "db/migrations", fixtures(path = "seed", scripts("a", "b"))"#,
            "async fn t(pool: Pool) {}",
        )
        .unwrap();
        for expected in [
            r#". migrations (:: std :: path :: Path :: new (env ! ("CARGO_MANIFEST_DIR")) . join ("db/migrations"))"#,
            r#". fixture_sql ("seed/a.sql" , include_str ! ("seed/a.sql")) . fixture_sql ("seed/b.sql" , include_str ! ("seed/b.sql"))"#,
            "< Pool as :: pgharness :: Inject > :: inject",
        ] {
            assert!(out.contains(expected), "missing {expected} in {out}");
        }
        let out = expand_str("migrations = false", "async fn t() {}").unwrap();
        assert!(out.contains(". without_migrations ()"), "{out}");
        let out = expand_str(
            r#"fixtures("users", "../more/posts.sql")"#,
            "async fn t() {}",
        )
        .unwrap();
        assert!(
            out.contains(r#". fixture_sql ("fixtures/users.sql" , include_str ! ("fixtures/users.sql")) . fixture_sql ("../more/posts.sql" , include_str ! ("../more/posts.sql"))"#),
            "{out}"
        );
    }

    #[test]
    fn a_test_db_parameter_borrows_the_database() {
        let out = expand_str("", "async fn t(mut db: pgharness::TestDb) {}").unwrap();
        assert!(out.contains("mut db : & mut pgharness :: TestDb"), "{out}");
        assert!(out.contains("(& mut __pgharness_db)"), "{out}");
        assert!(!out.contains("Inject"), "{out}");
    }

    #[test]
    fn misuse_is_a_compile_error_that_says_what_to_write() {
        for (attr, item, expected) in [
            ("", "fn t() {}", "needs an `async fn`"),
            ("retries = 3", "async fn t() {}", "unknown argument"),
            (
                "migrator = MIGRATOR",
                "async fn t() {}",
                "a string naming a static sqlx `Migrator`",
            ),
            (
                "migrations = true",
                "async fn t() {}",
                "`migrations = false`",
            ),
            ("fixtures(1)", "async fn t() {}", "expected fixture names"),
            (
                "",
                "async fn t(a: TestDb, b: TestDb) {}",
                "one `TestDb` parameter at most",
            ),
            (
                "",
                "async fn t((a, b): (Pool, Pool)) {}",
                "name the parameter",
            ),
        ] {
            let error = expand_str(attr, item).unwrap_err();
            assert!(error.contains(expected), "{attr} / {item}: {error}");
        }
    }
}
