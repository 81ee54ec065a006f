package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/internal/certcodec"
)

// The operator commands: each parses its flags, makes one admin call and prints the answer
// as one JSON value on stdout.

func runDevices(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("devices")
	refused := fs.Bool("refused", false, "list the hubs' recently refused connections and why, instead")
	if err := parse(e, fs, "--dir DIR [--refused]", args); err != nil {
		return err
	}
	path := "/v1/devices"
	if *refused {
		path = "/v1/refusals"
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodGet, path, nil, nil, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runRegistrations(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("registrations")
	device := fs.String("device", "", "only this device's, by registration `ID` or device ID")
	if err := parse(e, fs, "--dir DIR [--device ID]", args); err != nil {
		return err
	}
	q := url.Values{}
	if *device != "" {
		q.Set("device", *device)
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodGet, "/v1/registrations", q, nil, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runTelemetry(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("telemetry")
	device := fs.String("device", "", "only messages from this device `ID`")
	wait := fs.Int("wait", 0, "first wait until `N` messages have arrived")
	timeout := fs.Duration("timeout", 30*time.Second, "how long --wait waits")
	if err := parse(e, fs, "--dir DIR [--device ID] [--wait N [--timeout D]]", args); err != nil {
		return err
	}
	q := url.Values{}
	if *device != "" {
		q.Set("device", *device)
	}
	if *wait > 0 {
		q.Set("wait", strconv.Itoa(*wait))
		q.Set("timeout", timeout.String())
	}
	var out []telemetryJSON
	if err := newAdminClient(*dir).call(ctx, http.MethodGet, "/v1/telemetry", q, nil, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runC2D(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("c2d")
	device := fs.String("device", "", "device `ID`")
	payload := fs.String("payload", "", "message `body`")
	var props multiFlag
	fs.Var(&props, "property", "`name=value` application property (repeatable; $.-prefixed names are system properties)")
	if err := parse(e, fs, "--dir DIR --device ID --payload BODY [--property NAME=VALUE]...", args); err != nil {
		return err
	}
	if *device == "" {
		return usageErrorf("c2d: --device is required")
	}
	req := c2dRequest{Device: *device, Payload: *payload, Properties: map[string]string{}}
	for _, p := range props {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return usageErrorf("c2d: --property %q is not name=value", p)
		}
		req.Properties[k] = v
	}
	var out map[string]string
	if err := newAdminClient(*dir).call(ctx, http.MethodPost, "/v1/c2d", nil, req, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runInvoke(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("invoke")
	device := fs.String("device", "", "device `ID`")
	method := fs.String("method", "", "method `name`")
	payload := fs.String("payload", "", "request body, `JSON`")
	timeout := fs.Duration("timeout", defaultMethodTimeout, "response timeout, 5s to 5m as IoT Hub allows")
	if err := parse(e, fs, "--dir DIR --device ID --method NAME [--payload JSON] [--timeout D]", args); err != nil {
		return err
	}
	if *device == "" || *method == "" {
		return usageErrorf("invoke: --device and --method are required")
	}
	if *timeout < minMethodTimeout || *timeout > maxMethodTimeout {
		return usageErrorf("invoke: --timeout %v: IoT Hub allows %v to %v", *timeout, minMethodTimeout, maxMethodTimeout)
	}
	req := invokeRequest{Device: *device, Method: *method, TimeoutSeconds: timeout.Seconds()}
	if *payload != "" {
		if !json.Valid([]byte(*payload)) {
			return usageErrorf("invoke: --payload is not JSON")
		}
		req.Payload = json.RawMessage(*payload)
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodPost, "/v1/invoke", nil, req, &out); err != nil {
		// A device that is offline or does not answer: the service's status and code, on
		// stdout for scripts, as an answer is.
		if ae := (*errAdmin)(nil); errors.As(err, &ae) && json.Valid(ae.body) && bytes.Contains(ae.body, []byte(`"error_code"`)) {
			printJSON(e.stdout, json.RawMessage(ae.body))
		}
		return err
	}
	return printJSON(e.stdout, out)
}

func runTwin(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("twin")
	device := fs.String("device", "", "device `ID`")
	desired := fs.String("desired", "", "patch the desired properties with this `JSON` object (null deletes)")
	if err := parse(e, fs, "--dir DIR --device ID [--desired JSON]", args); err != nil {
		return err
	}
	if *device == "" {
		return usageErrorf("twin: --device is required")
	}
	c := newAdminClient(*dir)
	var out json.RawMessage
	var err error
	if *desired != "" {
		if !json.Valid([]byte(*desired)) {
			return usageErrorf("twin: --desired is not JSON")
		}
		err = c.call(ctx, http.MethodPatch, "/v1/twin", nil, twinRequest{Device: *device, Desired: json.RawMessage(*desired)}, &out)
	} else {
		err = c.call(ctx, http.MethodGet, "/v1/twin", url.Values{"device": {*device}}, nil, &out)
	}
	if err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runDisable(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("disable")
	device := fs.String("device", "", "device `ID`")
	enable := fs.Bool("enable", false, "re-enable the device instead")
	if err := parse(e, fs, "--dir DIR --device ID [--enable]", args); err != nil {
		return err
	}
	return deviceCall(ctx, e, *dir, "disable", "/v1/disable", deviceRequest{Device: *device, Enable: *enable})
}

func runDelete(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("delete")
	device := fs.String("device", "", "device `ID`")
	if err := parse(e, fs, "--dir DIR --device ID", args); err != nil {
		return err
	}
	return deviceCall(ctx, e, *dir, "delete", "/v1/delete", deviceRequest{Device: *device})
}

func runMove(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("move")
	device := fs.String("device", "", "device `ID`")
	hub := fs.String("hub", "", "destination hub `name` as 'devices' and serve print it")
	if err := parse(e, fs, "--dir DIR --device ID --hub NAME", args); err != nil {
		return err
	}
	if *hub == "" {
		return usageErrorf("move: --hub is required")
	}
	return deviceCall(ctx, e, *dir, "move", "/v1/move", deviceRequest{Device: *device, Hub: *hub})
}

func deviceCall(ctx context.Context, e *env, dir, name, path string, req deviceRequest) error {
	if req.Device == "" {
		return usageErrorf("%s: --device is required", name)
	}
	var out json.RawMessage
	if err := newAdminClient(dir).call(ctx, http.MethodPost, path, nil, req, &out); err != nil {
		return err
	}
	return printJSON(e.stdout, out)
}

func runEnroll(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("enroll")
	group := fs.String("group", "", "enrollment group `ID` (with --ca or --symmetric-key)")
	regID := fs.String("registration-id", "", "individual enrollment for this registration `ID` (with --cert, --thumbprint, --symmetric-key or --tpm-ek)")
	caFile := fs.String("ca", "", "group: CA certificate `file` (PEM) that device chains must reach")
	certFile := fs.String("cert", "", "individual: the device certificate `file` (PEM); its thumbprint is enrolled")
	thumbprint := fs.String("thumbprint", "", "individual: the device certificate's SHA-256 or SHA-1 `hex`")
	key := fs.String("symmetric-key", "", "symmetric key, `base64` (group key or device key)")
	tpmEK := fs.String("tpm-ek", "", "individual: a TPM's endorsement key (TPM attestation, over HTTPS): a `file` holding it, or it in base64, as `unicity factory ek` prints it")
	deviceID := fs.String("device-id", "", "individual: hub device `ID` (default: the registration ID)")
	disabled := fs.Bool("disabled", false, "enroll disabled")
	twin := fs.String("initial-twin", "", "initial twin `JSON` ({\"properties\":{\"desired\":…}} or the desired object)")
	reply := fs.String("allocation-reply", "", "custom allocation: answer every registration with this AllocationResponse `JSON` ({\"iotHubHostName\":HUB,\"payload\":…,\"initialTwin\":…})")
	script := fs.String("allocation-script", "", "custom allocation: run this `program` for each registration, Azure's AllocationRequest JSON on stdin, its AllocationResponse on stdout")
	if err := parse(e, fs, "--dir DIR (--group ID (--ca FILE | --symmetric-key B64) | --registration-id ID (--cert FILE | --thumbprint HEX | --symmetric-key B64 | --tpm-ek FILE|B64)) [--device-id ID] [--disabled] [--initial-twin JSON] [--allocation-reply JSON | --allocation-script PROGRAM]", args); err != nil {
		return err
	}
	if (*group == "") == (*regID == "") {
		return usageErrorf("enroll: give exactly one of --group and --registration-id")
	}
	if *reply != "" && *script != "" {
		return usageErrorf("enroll: give --allocation-reply or --allocation-script, not both")
	}
	req := enrollRequest{Group: *group, RegistrationID: *regID, Thumbprint: *thumbprint, DeviceID: *deviceID, Disabled: *disabled}
	if *reply != "" {
		if !json.Valid([]byte(*reply)) {
			return usageErrorf("enroll: --allocation-reply is not JSON")
		}
		req.AllocationReply = json.RawMessage(*reply)
	}
	if *script != "" {
		req.AllocationScript = absPath(*script) // the emulator runs it from elsewhere
	}
	if *key != "" {
		k, err := base64.StdEncoding.DecodeString(*key)
		if err != nil {
			return usageErrorf("enroll: --symmetric-key: %v", err)
		}
		req.SymmetricKey = k
	}
	if *tpmEK != "" {
		ek, err := readTPMEK(*tpmEK)
		if err != nil {
			return usageErrorf("enroll: --tpm-ek: %v", err)
		}
		req.EndorsementKey = ek
	}
	if *twin != "" {
		if !json.Valid([]byte(*twin)) {
			return usageErrorf("enroll: --initial-twin is not JSON")
		}
		req.InitialTwin = json.RawMessage(*twin)
	}
	if *caFile != "" {
		data, err := os.ReadFile(*caFile)
		if err != nil {
			return err
		}
		req.CAPEM = string(data)
	}
	if *certFile != "" {
		certs, err := certcodec.ReadCertificates(*certFile)
		if err != nil {
			return err
		}
		req.Thumbprint = certcodec.Thumbprint(certs[0])
	}
	var out json.RawMessage
	if err := newAdminClient(*dir).call(ctx, http.MethodPost, "/v1/enroll", nil, req, &out); err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	return printJSON(e.stdout, out)
}

// readTPMEK reads an endorsement key as the portal takes it: the base64 of its marshalled
// TPM2B_PUBLIC, given as is or in a file (a file of the binary TPM2B_PUBLIC, as
// tpm2_readpublic -o writes it, is taken too).
func readTPMEK(arg string) ([]byte, error) {
	data, err := os.ReadFile(arg)
	switch {
	case err == nil:
		if ek, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(data))); err == nil {
			return ek, nil
		}
		return data, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, err
	}
	ek, err := base64.StdEncoding.DecodeString(strings.TrimSpace(arg))
	if err != nil {
		return nil, fmt.Errorf("%q is neither a file nor base64", arg)
	}
	return ek, nil
}
