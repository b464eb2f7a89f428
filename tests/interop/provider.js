// A real OpenID Provider for jwtproxy's interoperability tests (tests/interop/).
//
// It runs panva/oidc-provider (OpenID Certified) on loopback with:
//   * the client_credentials grant and resource indicators (RFC 8707);
//   * one resource server, indicator RESOURCE below, whose access tokens are RFC 9068 JWTs
//     (`typ: at+jwt`, `aud: "api"`, `scope`, plus an extra `role` claim) signed with --alg;
//   * the signing keys read from --keys (a JWKS *with* private parts, written by the Python
//     test), so that key rotation is "restart with another key file";
//   * sender-constrained access tokens: DPoP (RFC 9449; any client that sends a DPoP proof to the
//     token endpoint gets a token with cnf.jkt) and certificate-bound tokens (RFC 8705 §3; the
//     client `mtls-app` gets cnf["x5t#S256"] of the certificate it presents, which on this plain
//     HTTP test server arrives URL-encoded in the X-Client-Cert header, as a TLS-terminating
//     proxy would pass it).
//
// Usage: node provider.js --port P --keys FILE --alg ALG [--introspection]
//   --port 0 picks a free port. The issuer is http://127.0.0.1:<port>. Once listening, one
//   JSON line {"ready": true, "port": P, "issuer": ..., "alg": ...} is printed on stdout.
//   --introspection adds what an opaque-token deployment needs, and nothing changes without it:
//     * a second resource server, indicator OPAQUE_RESOURCE, whose access tokens are opaque
//       (reference) tokens, `accessTokenFormat: 'opaque'`, with the same audience and scopes;
//     * the RFC 7662 introspection endpoint (/token/introspection) and the RFC 7009 revocation
//       endpoint (/token/revocation), both announced in the discovery document;
//     * INTROSPECTOR, a client with no grant of its own that authenticates with
//       client_secret_basic to introspect (the resource server's credentials, jwtproxy's here).
//   Opaque client_credentials tokens have no resource owner, so oidc-provider's introspection
//   response would carry no `sub`; as Ory Hydra does, the client_id is then the subject.
//
// Test-only endpoint, not part of oidc-provider: GET /__test/stats answers how many times each
// path was requested since start, so a test can count JWKS fetches made by the gateway.

import http from 'node:http';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

export const RESOURCE = 'https://api.jwtproxy.test';
export const AUDIENCE = 'api';
export const OPAQUE_RESOURCE = 'https://opaque.jwtproxy.test';
export const INTROSPECTOR = {
  client_id: 'jwtproxy-rs',
  client_secret: 'jwtproxy-rs-secret-0123456789abcdef',
};

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    keys: { type: 'string' },
    alg: { type: 'string', default: 'RS256' },
    introspection: { type: 'boolean', default: false },
  },
});
if (!args.keys) {
  process.stderr.write('provider.js: --keys FILE is required\n');
  process.exit(2);
}
const alg = args.alg;
const jwks = JSON.parse(readFileSync(args.keys, 'utf8'));

// Two service clients: one may write payments, the other only read them. The `role` claim is
// what a real deployment would look up in its client registry (extraTokenClaims below).
const CLIENTS = [
  {
    client_id: 'merchant-app',
    client_secret: 'merchant-app-secret-0123456789abcdef',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'payments:read payments:write',
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: alg,
  },
  {
    client_id: 'reporting-app',
    client_secret: 'reporting-app-secret-0123456789abcdef',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'payments:read',
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: alg,
  },
];
CLIENTS.push({
  client_id: 'mtls-app',
  client_secret: 'mtls-app-secret-0123456789abcdef0123',
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  scope: 'payments:read',
  token_endpoint_auth_method: 'client_secret_basic',
  id_token_signed_response_alg: alg,
  tls_client_certificate_bound_access_tokens: true,
});
const ROLES = { 'merchant-app': 'merchant', 'reporting-app': 'auditor', 'mtls-app': 'auditor' };
if (args.introspection) {
  CLIENTS.push({
    ...INTROSPECTOR,
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: alg,
  });
}

const counts = Object.create(null);

// Listen first (port 0 = any free port) so the issuer URL can name the real port.
const server = http.createServer();
server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks,
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      id_token_signed_response_alg: alg,
      token_endpoint_auth_method: 'client_secret_basic',
    },
    scopes: ['payments:read', 'payments:write'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      // Lets the key file hold encryption keys (use: enc), which the provider then publishes
      // next to its signing keys, as Keycloak does by default with its RSA-OAEP key.
      encryption: { enabled: true },
      introspection: { enabled: args.introspection },
      revocation: { enabled: args.introspection },
      dPoP: { enabled: true },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        getCertificate(ctx) {
          const escaped = ctx.get('x-client-cert');
          return escaped ? decodeURIComponent(escaped) : undefined;
        },
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => RESOURCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator) => {
          if (args.introspection && resourceIndicator === OPAQUE_RESOURCE) {
            return {
              scope: 'payments:read payments:write',
              audience: AUDIENCE,
              accessTokenTTL: 600,
              accessTokenFormat: 'opaque',
            };
          }
          if (resourceIndicator !== RESOURCE) {
            throw new Provider.errors.InvalidTarget();
          }
          return {
            scope: 'payments:read payments:write',
            audience: AUDIENCE,
            accessTokenTTL: 600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        },
      },
    },
    enabledJWA: {
      dPoPSigningAlgValues: ['ES256', 'EdDSA', 'PS256', 'RS256'],
    },
    extraTokenClaims: async (ctx, token) => {
      const role = ROLES[token.clientId];
      const claims = role ? { role } : {};
      if (args.introspection && token.resourceServer?.accessTokenFormat === 'opaque' && !token.accountId) {
        claims.sub = token.clientId; // returned by introspection as a top-level member
      }
      return Object.keys(claims).length ? claims : undefined;
    },
    // Only loopback, only tests: no cookies are ever set by the client_credentials grant, but
    // oidc-provider wants signing keys for them anyway.
    cookies: { keys: ['interop-test-cookie-key-not-a-secret'] },
  });

  provider.use(async (ctx, next) => {
    if (ctx.path === '/__test/stats') {
      ctx.body = { counts };
      return;
    }
    counts[ctx.path] = (counts[ctx.path] || 0) + 1;
    await next();
  });

  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ ready: true, port, issuer, alg })}\n`);
});

server.on('error', (err) => {
  process.stderr.write(`provider.js: ${err.message}\n`);
  process.exit(1);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
