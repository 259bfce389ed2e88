package testingutil

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Executable returns the absolute path of the program at path (a flag of
// a benchmark, such as -regiond bin/regiond), or an error saying that
// make build builds it.
func Executable(path string) (string, error) {
	exe, err := filepath.Abs(path)
	if err == nil {
		_, err = os.Stat(exe)
	}
	if err != nil {
		return "", fmt.Errorf("%s: %v (make build builds bin/regiond and bin/guestbook)", path, err)
	}
	return exe, nil
}

// Latencies parses a comma-separated list of one-way latencies, such as
// "0,20ms": 0 (or "0") and up.
func Latencies(list string) ([]time.Duration, error) {
	var out []time.Duration
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		d, err := time.ParseDuration(s)
		if s == "0" {
			d, err = 0, nil
		}
		if err != nil || d < 0 {
			return nil, fmt.Errorf("%q is not a duration (e.g. 20ms)", s)
		}
		out = append(out, d)
	}
	return out, nil
}
