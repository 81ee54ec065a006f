package main

import (
	"encoding/json"
	"errors"
	"flag"
	"io"
)

// exitKinds names the exit codes in --json output, for scripts that would rather branch on
// a word than on a number.
var exitKinds = map[int]string{
	exitFailure:     "failure",
	exitUsage:       "usage",
	exitUnavailable: "unreachable",
	exitTempFail:    "temporary",
	exitRefused:     "refused",
	exitConfig:      "config",
}

// failureReport is what a command run with --json prints when it fails before it has a
// result of its own to print.
type failureReport struct {
	Error    string `json:"error"`
	Kind     string `json:"kind"`
	ExitCode int    `json:"exit_code"`
}

// jsonOutput is a command's --json flag. With it, the command prints exactly one JSON object
// on stdout: its result, or (see finish) its failure.
type jsonOutput struct {
	on      bool
	w       io.Writer
	printed bool
}

// jsonFlag registers --json on fs. run reports a failure through it when the command
// printed nothing.
func (e *env) jsonFlag(fs *flag.FlagSet, usage string) *jsonOutput {
	e.output = &jsonOutput{w: e.stdout}
	fs.BoolVar(&e.output.on, "json", false, usage)
	return e.output
}

// print writes v as the command's one object.
func (j *jsonOutput) print(v any) error {
	j.printed = true
	return json.NewEncoder(j.w).Encode(v)
}

// finish prints err as a failureReport when --json is on and nothing was printed yet, and
// returns err. It does nothing for a nil receiver (a command without --json).
func (j *jsonOutput) finish(err error) error {
	if j == nil || !j.on || j.printed || err == nil || errors.Is(err, flag.ErrHelp) {
		return err
	}
	code := exitCode(err)
	j.print(failureReport{Error: err.Error(), Kind: exitKinds[code], ExitCode: code})
	return err
}
