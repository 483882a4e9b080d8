"""Send one KServe v2 request to a mesh pod with tritonclient, by model name.

    python examples/infer.py [MODEL_ID] [--url localhost:8033]

Works against the demo models (`modelmesh serve --demo-models N`): input x FP32 [1, 64].
"""

import argparse

import numpy as np
import tritonclient.grpc as tc

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="demo-0007")
parser.add_argument("--url", default="localhost:8033")
parser.add_argument("--features", type=int, default=64)
args = parser.parse_args()

client = tc.InferenceServerClient(args.url)
x = np.arange(args.features, dtype=np.float32).reshape(1, -1) / args.features
inp = tc.InferInput("x", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer(args.model, [inp])
y = result.as_numpy("y")
print(f"{args.model}: y[0, :4] = {np.round(y[0, :4], 4).tolist()} (shape {list(y.shape)})")
client.close()
