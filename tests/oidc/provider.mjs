// A real OpenID provider (the certified npm package `oidc-provider`) for the portal's tests.
// Started by tests/oidc_provider.py: `node provider.mjs` with TB_OIDC (JSON) in the
// environment: {"port": 0, "clients": [...], "jwks": {"keys": [private JWKs]},
// "users": {"<login>": {"email": ..., "groups": [...]}}}. It prints one line of JSON,
// {"issuer": "http://127.0.0.1:PORT"}, once it listens; it stops when its stdin closes.
// Sign-in uses the provider's own development login form (any password); consent is
// granted at once (a first-party client).
import http from 'node:http';
import Provider from 'oidc-provider';

const conf = JSON.parse(process.env.TB_OIDC);
const server = http.createServer();
server.listen(conf.port || 0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: conf.clients,
    jwks: conf.jwks,
    cookies: { keys: ['trio-bridge-tests-only'] },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
    features: { devInteractions: { enabled: true } },
    pkce: { required: () => true },
    ttl: { IdToken: conf.id_token_ttl || 3600 },
    async findAccount(ctx, id) {
      const user = conf.users[id];
      if (!user) return undefined;
      return {
        accountId: id,
        async claims() {
          return {
            sub: id,
            email: user.email,
            email_verified: user.email_verified ?? true,
            name: user.name || id,
            groups: user.groups || [],
          };
        },
      };
    },
    async loadExistingGrant(ctx) {
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid email profile groups');
      await grant.save();
      return grant;
    },
  });
  provider.proxy = false;
  server.on('request', provider.callback());
  process.stdout.write(JSON.stringify({ issuer }) + '\n');
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
