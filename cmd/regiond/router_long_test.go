//go:build long

package main

import "testing"

// TestLong_ReadYourWrites is TestRouter_ReadYourWrites with 10,000
// sequences (make test-long): about 40 s of both CPUs, too much beside the
// other packages of make test.
func TestLong_ReadYourWrites(t *testing.T) {
	t.Parallel()
	testReadYourWrites(t, 10000)
}
