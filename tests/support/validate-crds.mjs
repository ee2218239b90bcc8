// Validates prometheus-operator objects (ServiceMonitor, PrometheusRule) against the CRDs'
// OpenAPI schemas, as packaged by @kubernetes-models/prometheus-operator.
// Usage: node validate-crds.mjs NODE_MODULES_DIR FILE...
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modules, ...files] = process.argv.slice(2);
const load = (p) => import(pathToFileURL(path.join(modules, p)).href);
const YAML = await load("yaml/dist/index.js");
const v1 = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const kinds = {
  ServiceMonitor: (await load(`${v1}/ServiceMonitor.js`)).ServiceMonitor,
  PrometheusRule: (await load(`${v1}/PrometheusRule.js`)).PrometheusRule,
};
let failed = false;
for (const file of files) {
  for (const doc of YAML.parseAllDocuments(fs.readFileSync(file, "utf8"))) {
    const obj = doc.toJS();
    const Kind = kinds[obj?.kind];
    if (!Kind) {
      console.error(`${file}: no schema for kind ${obj?.kind}`);
      failed = true;
      continue;
    }
    try {
      new Kind(obj).validate();
      console.log(`${file}: ${obj.kind} valid`);
    } catch (e) {
      console.error(`${file}: ${obj.kind} invalid: ${e.message}`);
      failed = true;
    }
  }
}
process.exit(failed ? 1 : 0);
