'use strict';
// The Node.js peer of the jwtproxy benchmark: what a team writes when it puts JWT checks in an
// Express gateway instead of running a dedicated proxy. It does the same job as jwtproxy's bench
// config: verify a bearer JWT (RS256 / ES256, keys from a local JWKS chosen by kid, iss + aud +
// exp checked by jsonwebtoken), strip client-supplied identity headers, inject x-user-id /
// x-user-role / x-scope, and forward over a keep-alive agent. `/open` is the auth-off route.
//
// Configuration comes from the environment so that bench/run.py owns every value:
//   PORT, UPSTREAM (http://host:port), JWKS_FILE, ISSUER, AUDIENCE
// There is no verdict cache: jsonwebtoken verifies every request, as such middleware does.

const fs = require('fs');
const http = require('http');
const crypto = require('crypto');
const express = require('express');
const jwt = require('jsonwebtoken');
const { createProxyMiddleware } = require('http-proxy-middleware');

const PORT = parseInt(process.env.PORT || '18783', 10);
const UPSTREAM = process.env.UPSTREAM || 'http://127.0.0.1:18790';
const ISSUER = process.env.ISSUER;
const AUDIENCE = process.env.AUDIENCE;
const jwks = JSON.parse(fs.readFileSync(process.env.JWKS_FILE, 'utf8'));

// Keys are imported once (KeyObject), not per request.
const keysByKid = new Map();
for (const jwk of jwks.keys) {
  keysByKid.set(jwk.kid, crypto.createPublicKey({ key: jwk, format: 'jwk' }));
}
const VERIFY_OPTIONS = { algorithms: ['RS256', 'ES256'], issuer: ISSUER, audience: AUDIENCE };
const IDENTITY = [['x-user-id', 'sub'], ['x-user-role', 'role'], ['x-scope', 'scope']];

function getKey(header, callback) {
  const key = keysByKid.get(header.kid);
  if (key === undefined) {
    callback(new Error('unknown key'));
  } else {
    callback(null, key);
  }
}

function unauthorized(res, description) {
  const body = JSON.stringify({ error: 'invalid_token', error_description: description });
  res.status(401)
    .set('WWW-Authenticate', `Bearer realm="node-gateway", error="invalid_token"`)
    .type('application/json')
    .send(body);
}

function stripIdentity(req) {
  for (const [name] of IDENTITY) {
    delete req.headers[name];
    delete req.headers[name.replace(/-/g, '_')];
  }
}

function requireJwt(req, res, next) {
  const auth = req.headers.authorization;
  const match = auth === undefined ? null : /^bearer +(\S+)$/i.exec(auth);
  if (match === null) {
    res.status(401).set('WWW-Authenticate', 'Bearer realm="node-gateway"').end();
    return;
  }
  jwt.verify(match[1], getKey, VERIFY_OPTIONS, (err, claims) => {
    if (err) {
      unauthorized(res, 'token rejected');
      return;
    }
    for (const [header, claim] of IDENTITY) {
      const value = claims[claim];
      if (value !== undefined) {
        req.headers[header] = typeof value === 'string' ? value : JSON.stringify(value);
      }
    }
    next();
  });
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 128, maxFreeSockets: 128 });
const proxy = createProxyMiddleware({ target: UPSTREAM, agent, xfwd: true });

const app = express();
app.disable('x-powered-by');
app.disable('etag');
app.use((req, res, next) => {
  // Identity headers are stripped on every route, the auth-off one included (as jwtproxy does).
  stripIdentity(req);
  if (req.path === '/open' || req.path.startsWith('/open/')) {
    next();
  } else {
    requireJwt(req, res, next);
  }
});
app.use(proxy);

const server = app.listen(PORT, '127.0.0.1', () => {
  process.stdout.write(`node-gateway listening on 127.0.0.1:${PORT}\n`);
});
server.keepAliveTimeout = 75000;
server.headersTimeout = 76000;
process.on('SIGTERM', () => server.close(() => process.exit(0)));
