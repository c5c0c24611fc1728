"""The config service: tenants, PLC definitions, device profiles, and their push to collectors.

Each tenant's PLCs, collectors, revisions and audit trail are its own (row-level security: store.py);
quotas of a tenant's PLCs, tags and collectors are checked as they are written; WatchPlcs streams a
collector's tenant only (runtime/notify.py TenantListener). The tenant RPCs and who may call them: servicer.py."""
