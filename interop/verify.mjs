// Verifies tokens from a running token-exchange with `jose`, which fetches
// the live JWKS itself (createRemoteJWKSet). Same input as verify.py.

import { createRemoteJWKSet, jwtVerify, decodeProtectedHeader, errors } from "jose";

const fail = (msg) => {
  console.error(msg);
  process.exit(1);
};

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

function checkClaims(got, c) {
  const names = new Set([...Object.keys(c.claims), "iat", "nbf", "exp", "jti"]);
  const gotNames = Object.keys(got);
  if (gotNames.length !== names.size || !gotNames.every((n) => names.has(n))) {
    fail(`claim names ${gotNames.sort()} != ${[...names].sort()}`);
  }
  for (const [name, value] of Object.entries(c.claims)) {
    if (got[name] !== value || typeof got[name] !== typeof value) {
      fail(`claim ${name}: ${JSON.stringify(got[name])} != ${JSON.stringify(value)}`);
    }
  }
  for (const name of ["iat", "nbf", "exp"]) {
    if (!Number.isInteger(got[name])) fail(`${name} is not an integer`);
  }
  if (got.nbf !== got.iat || got.exp - got.iat !== c.lifetime) fail(`times: ${got.iat} ${got.nbf} ${got.exp}`);
  if (typeof got.jti !== "string" || !UUID4.test(got.jti)) fail(`jti is not a UUID v4: ${got.jti}`);
  if (typeof got.aud !== "string") fail("aud is not a plain string");
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const spec = JSON.parse(Buffer.concat(chunks).toString());
const jwks = createRemoteJWKSet(new URL(spec.jwks_url));

for (const c of spec.cases) {
  const header = decodeProtectedHeader(c.token);
  if ("typ" in header || Object.keys(header).sort().join() !== "alg,kid") {
    fail(`unexpected header ${JSON.stringify(header)}`);
  }
  let payload;
  try {
    ({ payload } = await jwtVerify(c.token, jwks, {
      issuer: "token-exchange",
      audience: c.audience,
      algorithms: [header.alg],
      requiredClaims: ["exp", "iat", "nbf", "iss", "aud"],
    }));
  } catch (e) {
    if (c.expect === "expired" && e instanceof errors.JWTExpired) continue;
    fail(`${header.alg} token refused: ${e}`);
  }
  if (c.expect === "expired") fail("an expired token was accepted");
  checkClaims(payload, c);
}
console.log(`ok ${spec.cases.length}`);
