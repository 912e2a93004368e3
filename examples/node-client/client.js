// Streams one generation from the edgelora router. Knows only the .proto files in proto/:
// @grpc/proto-loader reads them at start, so there is no code generation step.
//
//   npm install
//   node client.js [ADDRESS] [PROMPT] [ADAPTER_ID]
//   node client.js localhost:50051 "What is the capital of France?"
//   node client.js localhost:50051 "How do airplanes stay in the air?" shout
//
// A server with API keys: EDGELORA_API_KEY=k-... is sent as 'authorization: Bearer k-...'.
// A server with TLS: EDGELORA_TLS_CA=path/to/ca.pem (the certificate bundle to trust).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.EDGELORA_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync('edgelora/v1/router.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: true, // field names as written in the .proto files: adapter_id, finish_reason, ...
  longs: String,
  enums: String,
  defaults: true, // absent fields read as "" and 0, as in every other gRPC language
});
const { edgelora } = grpc.loadPackageDefinition(definition);

const [address = 'localhost:50051', prompt = 'What is the capital of France?', adapterId = '']
  = process.argv.slice(2);
const credentials = process.env.EDGELORA_TLS_CA
  ? grpc.credentials.createSsl(fs.readFileSync(process.env.EDGELORA_TLS_CA))
  : grpc.credentials.createInsecure();
const router = new edgelora.v1.Router(address, credentials);
const metadata = new grpc.Metadata();
if (process.env.EDGELORA_API_KEY) {
  metadata.set('authorization', `Bearer ${process.env.EDGELORA_API_KEY}`);
}

const request = {
  messages: [{ role: 'user', content: prompt }],
  adapter_id: adapterId, // '' = base model, 'auto' = the router's selector, else a registered id
  params: { max_tokens: Number(process.env.MAX_TOKENS || 64) },
};
const call = router.GenerateStream(request, metadata, { deadline: Date.now() + 300_000 });

let last = null;
call.on('data', (chunk) => {
  process.stdout.write(chunk.text);
  last = chunk;
});
call.on('end', () => {
  if (last) {
    const usage = last.usage || {};
    process.stdout.write(`\n[${last.finish_reason}; ${usage.prompt_tokens} prompt + `
      + `${usage.completion_tokens} completion tokens; adapter ${last.adapter_id || 'base'}]\n`);
  }
  router.close();
});
call.on('error', (err) => {
  // gRPC status codes: UNAUTHENTICATED (no or unknown key), NOT_FOUND (unknown adapter),
  // INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...
  process.stderr.write(`\nerror: ${grpc.status[err.code]}: ${err.details}\n`);
  process.exitCode = 1;
  router.close();
});
