"""Who may call the mesh, and a record of who did.

Callers present API tokens (:mod:`.tokens`) that identity keeps hashed (:mod:`.token_store`);
every RPC needs one scope (:mod:`.scopes`); one server interceptor (:mod:`.guard`) checks the
token and the scope and records the call in the service's append-only audit log
(:mod:`.audit_log`). Outbound channels send this process's token (:mod:`.outbound`).
"""
