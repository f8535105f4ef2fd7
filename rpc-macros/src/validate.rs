//! Step 2: checks the trait against every rule, collecting all errors, and builds the model.
//!
//! Each error points at the offending tokens and says what to write instead.

use quote::ToTokens;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{FnArg, Pat, ReturnType, TraitItem, TraitItemFn, Type};

use crate::model::{Context, Method, Service};
use crate::parse::Parsed;

/// Names the expansion generates on `<Trait>Client`; a method of the same name would clash.
const RESERVED: &[&str] = &[
    "new",
    "with_format",
    "with_options",
    "with_timeout",
    "with_metadata",
    "options",
    "client",
    "into_service",
    "service_name",
    "methods",
];

#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, span: impl Spanned, message: impl std::fmt::Display) {
        self.add(syn::Error::new(span.span(), message));
    }

    fn push_tokens(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.add(syn::Error::new_spanned(tokens, message));
    }

    fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }
}

pub(crate) fn validate(parsed: Parsed) -> syn::Result<Service> {
    let Parsed { item, krate } = parsed;
    let mut errors = Errors::default();

    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.push_tokens(
            &item.generics,
            "a #[service] trait cannot be generic: clients and servers agree on concrete types; \
             remove the generic parameters",
        );
    }
    if let Some(unsafety) = &item.unsafety {
        errors.push(unsafety, "a #[service] trait cannot be `unsafe`");
    }

    let mut methods = Vec::new();
    for trait_item in &item.items {
        match trait_item {
            TraitItem::Fn(f) => match method(f) {
                Ok(m) => methods.push(m),
                Err(e) => errors.add(e),
            },
            other => errors.push_tokens(
                other,
                "a #[service] trait holds only `async fn` methods; move constants and types \
                 out of the trait",
            ),
        }
    }

    let ident = item.ident.clone();
    match errors.0 {
        Some(e) => Err(e),
        None => Ok(Service {
            attrs: item.attrs,
            vis: item.vis,
            name: ident.unraw().to_string(),
            ident,
            supertraits: item.supertraits,
            methods,
            krate,
        }),
    }
}

/// One method; every problem with it in one error.
fn method(f: &TraitItemFn) -> syn::Result<Method> {
    let mut errors = Errors::default();
    let errors = &mut errors;
    let sig = &f.sig;
    let ident = sig.ident.clone();
    let name = ident.unraw().to_string();

    if sig.asyncness.is_none() {
        errors.push(
            sig.fn_token,
            format!("service methods must be async: write `async fn {name}(&self, …)`"),
        );
    }
    if let Some(c) = &sig.constness {
        errors.push(c, "service methods cannot be `const`");
    }
    if let Some(u) = &sig.unsafety {
        errors.push(u, "service methods cannot be `unsafe`");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push_tokens(
            &sig.generics,
            "service methods cannot be generic: the server must know each argument's type to \
             decode it; use a concrete type (an enum, if several shapes are needed)",
        );
    }
    if let Some(v) = &sig.variadic {
        errors.push_tokens(v, "service methods cannot be variadic");
    }
    if let Some(body) = &f.default {
        errors.push_tokens(
            body,
            "service methods cannot have a default body: write the body in the `impl` of the trait",
        );
    }
    if RESERVED.contains(&name.as_str()) {
        errors.push(
            &sig.ident,
            format!(
                "method name `{name}` collides with an item #[service] generates on the client \
                 (reserved: {}); rename the method",
                RESERVED.join(", ")
            ),
        );
    }

    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none() => {}
        Some(FnArg::Receiver(r)) if r.mutability.is_some() && r.reference.is_some() => errors.push_tokens(
            r,
            "service methods take `&self`, not `&mut self`: calls run concurrently on one service \
             value; keep mutable state behind a `Mutex` or an atomic",
        ),
        Some(FnArg::Receiver(r)) if r.reference.is_none() && r.colon_token.is_none() => errors.push_tokens(
            r,
            "service methods take `&self`, not `self`: one service value serves every call",
        ),
        Some(FnArg::Receiver(r)) => errors.push_tokens(r, "service methods take plain `&self`"),
        Some(other) => errors.push_tokens(
            other,
            format!("service methods need a `&self` receiver: write `async fn {name}(&self, …)`"),
        ),
        None => errors.push(
            sig.paren_token.span.join(),
            format!("service methods need a `&self` receiver: write `async fn {name}(&self)`"),
        ),
    }

    let mut context = None;
    let mut args = Vec::new();
    for (position, input) in inputs.enumerate() {
        let FnArg::Typed(arg) = input else { continue };
        let arg_ident = match &*arg.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.mutability.is_none() && p.subpat.is_none() => {
                Some(p.ident.clone())
            }
            pat => {
                errors.push_tokens(
                    pat,
                    "service method arguments must be plain names: write `name: Type` and \
                     destructure inside the method",
                );
                None
            }
        };
        if let Some((by_ref, ty)) = context_type(&arg.ty) {
            if position != 0 {
                errors.push_tokens(
                    &arg.ty,
                    "the call context must be the first argument after `&self`",
                );
            } else if let Some(ident) = arg_ident {
                context = Some(Context {
                    ident,
                    ty: ty.clone(),
                    by_ref,
                });
            }
            continue;
        }
        check_wire_type(&arg.ty, "argument", errors);
        if let Some(ident) = arg_ident {
            args.push((ident, (*arg.ty).clone()));
        }
    }

    let output = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => {
            check_wire_type(ty, "return type", errors);
            (**ty).clone()
        }
    };

    if let Some(e) = errors.0.take() {
        return Err(e);
    }
    let cfgs: Vec<_> = f
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg"))
        .cloned()
        .collect();
    let carried = f
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc") || a.path().is_ident("cfg"))
        .cloned()
        .collect();
    Ok(Method {
        attrs: f.attrs.clone(),
        carried,
        cfgs,
        ident,
        name,
        context,
        args,
        output,
    })
}

/// `CallContext` or `&CallContext` (any path ending in `CallContext`): the context argument.
fn context_type(ty: &Type) -> Option<(bool, &Type)> {
    let (by_ref, inner) = match ty {
        Type::Reference(r) if r.mutability.is_none() => (true, &*r.elem),
        other => (false, other),
    };
    match inner {
        Type::Path(p)
            if p.qself.is_none()
                && p.path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "CallContext") =>
        {
            Some((by_ref, inner))
        }
        _ => None,
    }
}

/// Arguments and return values cross the network: they must be owned, concrete types.
/// (Whether they implement serde's traits is checked by the compiler at the type's span.)
fn check_wire_type(ty: &Type, what: &str, errors: &mut Errors) {
    match ty {
        Type::Reference(r) => {
            let suggestion = match &*r.elem {
                Type::Path(p) if p.path.is_ident("str") => "`String` instead of `&str`",
                Type::Slice(_) => "`Vec<T>` instead of `&[T]`",
                _ => "the owned type instead of a reference",
            };
            errors.push_tokens(
                ty,
                format!("a service method {what} cannot be a reference: it is sent over the network; use {suggestion}"),
            );
        }
        Type::ImplTrait(_) => errors.push_tokens(
            ty,
            format!("a service method {what} cannot be `impl Trait`: the other side must know the concrete type to decode it"),
        ),
        Type::TraitObject(_) => errors.push_tokens(
            ty,
            format!("a service method {what} cannot be a trait object: use a concrete type"),
        ),
        Type::Infer(_) | Type::Never(_) => errors.push_tokens(ty, format!("a service method {what} needs a concrete type")),
        Type::Paren(p) => check_wire_type(&p.elem, what, errors),
        Type::Tuple(t) => t.elems.iter().for_each(|e| check_wire_type(e, what, errors)),
        Type::Array(a) => check_wire_type(&a.elem, what, errors),
        _ => {}
    }
}
