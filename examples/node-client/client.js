// Streams one generation from the edgelora router, uploads an adapter directory to it, or
// reports how good a generation was (ReportOutcome: "auto" learns from it). Knows
// only the .proto files in proto/: @grpc/proto-loader reads them at start, so there is no code
// generation step.
//
//   npm install
//   node client.js [ADDRESS] [PROMPT] [ADAPTER_ID]
//   node client.js localhost:50051 "What is the capital of France?"
//   node client.js localhost:50051 "How do airplanes stay in the air?" shout
//
//   node client.js ADDRESS upload DIR --id ID [--description TEXT] [--example-prompt TEXT]...
//                  [--replace]
//   node client.js localhost:50051 upload ../../adapters/demo/shout --id my-shout
//
//   node client.js ADDRESS outcome REQUEST_ID REWARD    (how good a generation was, 0..1)
//   node client.js localhost:50051 outcome 3f2c0d... 1
//
// A server with API keys: EDGELORA_API_KEY=k-... is sent as 'authorization: Bearer k-...'.
// A server with TLS: EDGELORA_TLS_CA=path/to/ca.pem (the certificate bundle to trust).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { Readable } = require('node:stream');
const { parseArgs } = require('node:util');
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

// A PEFT directory's files in upload order; the server takes no others, and card.json is optional.
const UPLOAD_FILES = ['adapter_config.json', 'adapter_model.safetensors', 'card.json'];
const CHUNK_BYTES = 1 << 20; // well under the 4 MiB a gRPC server accepts per message by default

const [address = 'localhost:50051', ...args] = process.argv.slice(2);
const credentials = process.env.EDGELORA_TLS_CA
  ? grpc.credentials.createSsl(fs.readFileSync(process.env.EDGELORA_TLS_CA))
  : grpc.credentials.createInsecure();
const router = new edgelora.v1.Router(address, credentials);
const metadata = new grpc.Metadata();
if (process.env.EDGELORA_API_KEY) {
  metadata.set('authorization', `Bearer ${process.env.EDGELORA_API_KEY}`);
}

function fail(message) {
  process.stderr.write(`error: ${message}\n`);
  process.exitCode = 1;
  router.close();
}

// gRPC status codes: UNAUTHENTICATED (no or unknown key), NOT_FOUND (unknown adapter),
// ALREADY_EXISTS (upload again with --replace), INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...
const failWithStatus = (err) => fail(`${grpc.status[err.code]}: ${err.details}`);

function generate(prompt = 'What is the capital of France?', adapterId = '') {
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
        + `${usage.completion_tokens} completion tokens; adapter ${last.adapter_id || 'base'}; `
        + `request ${last.request_id}]\n`);
    }
    router.close();
  });
  call.on('error', (err) => {
    process.stdout.write('\n'); // ends the text streamed so far
    failWithStatus(err);
  });
}

// The header, then each file as chunks named after it; a file is read a chunk at a time.
async function* uploadMessages(dir, header) {
  yield { header };
  for (const name of UPLOAD_FILES) {
    const file = path.join(dir, name);
    if (name === 'card.json' && !fs.existsSync(file)) continue;
    for await (const data of fs.createReadStream(file, { highWaterMark: CHUNK_BYTES })) {
      yield { chunk: { file_name: name, data } };
    }
  }
}

const UPLOAD_USAGE = 'usage: node client.js ADDRESS upload DIR --id ID [--description TEXT] '
  + '[--example-prompt TEXT]... [--replace]';

function upload(argv) {
  let values;
  let dir;
  try {
    ({ values, positionals: [dir] } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        id: { type: 'string' },
        description: { type: 'string' }, // none: card.json's, if it has one
        'example-prompt': { type: 'string', multiple: true },
        replace: { type: 'boolean' },
      },
    }));
  } catch (err) {
    return fail(`${err.message}\n${UPLOAD_USAGE}`);
  }
  if (!dir || !values.id) return fail(UPLOAD_USAGE);
  const header = {
    adapter_id: values.id,
    description: values.description ?? '',
    example_prompts: values['example-prompt'] ?? [],
    replace: values.replace ?? false,
  };
  let readError = null;
  const call = router.UploadAdapter(metadata, { deadline: Date.now() + 600_000 }, (err, reply) => {
    if (readError) return fail(readError.message); // err is then only our own cancel
    if (err) return failWithStatus(err);
    const { adapter } = reply;
    process.stdout.write(`registered ${adapter.adapter_id} (rank ${adapter.rank}, `
      + `digest ${adapter.digest})\n`);
    router.close();
  });
  // pipe() waits for the call to drain, so no more than a few chunks are ever held in memory;
  // cancelling on a read error makes the server drop what it got so far.
  const messages = Readable.from(uploadMessages(dir, header), { highWaterMark: 1 });
  messages.on('error', (err) => {
    readError = err;
    call.cancel();
  });
  messages.pipe(call);
}

function outcome([requestId, reward]) {
  if (!requestId || reward === undefined || Number.isNaN(Number(reward))) {
    return fail('usage: node client.js ADDRESS outcome REQUEST_ID REWARD (a number in [0, 1])');
  }
  const request = { request_id: requestId, reward: Number(reward) };
  router.ReportOutcome(request, metadata, { deadline: Date.now() + 30_000 }, (err, reply) => {
    if (err) return failWithStatus(err);
    process.stdout.write(`reported ${reward} for adapter ${reply.adapter_id || 'base'} `
      + `(${reply.reports_kept} reports kept for 'auto')\n`);
    router.close();
  });
}

if (args[0] === 'upload') {
  upload(args.slice(1));
} else if (args[0] === 'outcome') {
  outcome(args.slice(1));
} else {
  generate(...args);
}
