//! The service as the expansion sees it: validated, with every name and type resolved.

use proc_macro2::Ident;
use syn::punctuated::Punctuated;
use syn::{Attribute, Path, Token, Type, TypeParamBound, Visibility};

pub(crate) struct Service {
    /// Attributes of the trait (its docs, among others), kept on the trait.
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) ident: Ident,
    /// The user's supertraits, kept beside the `Send + Sync + 'static` the macro adds.
    pub(crate) supertraits: Punctuated<TypeParamBound, Token![+]>,
    /// The wire name: the trait's name without `r#`.
    pub(crate) name: String,
    pub(crate) methods: Vec<Method>,
    pub(crate) krate: Path,
}

pub(crate) struct Method {
    /// Every attribute of the method: kept on the trait method.
    pub(crate) attrs: Vec<Attribute>,
    /// The `#[doc]` and `#[cfg]` attributes, carried to the generated client method.
    pub(crate) carried: Vec<Attribute>,
    /// The `#[cfg]` attributes, carried to the dispatch arm and the name constant.
    pub(crate) cfgs: Vec<Attribute>,
    pub(crate) ident: Ident,
    /// The wire name: the method's name without `r#`.
    pub(crate) name: String,
    pub(crate) context: Option<Context>,
    pub(crate) args: Vec<(Ident, Type)>,
    /// The return type; `()` when none was written.
    pub(crate) output: Type,
}

/// A first argument of type `CallContext`, filled in by the server.
pub(crate) struct Context {
    pub(crate) ident: Ident,
    pub(crate) ty: Type,
    pub(crate) by_ref: bool,
}
