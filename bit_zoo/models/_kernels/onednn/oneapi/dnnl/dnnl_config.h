/*******************************************************************************
* bit_zoo's dnnl_config.h for building against the oneDNN that MindSpore ships
* (mindspore/lib/libdnnl.so.3, a threadpool-runtime CPU build). The other headers
* in this directory are oneDNN's own (onednn-devel 2026.1.0, oneDNN 3.13, Apache
* License 2.0, see ../LICENSE); this one replaces the package's SYCL configuration
* and keeps only what the C API headers need.
*******************************************************************************/
#ifndef ONEAPI_DNNL_DNNL_CONFIG_H
#define ONEAPI_DNNL_DNNL_CONFIG_H

#define DNNL_API __attribute__((visibility("default")))
#define DNNL_DEPRECATED __attribute__((deprecated))

#define DNNL_RUNTIME_NONE 0u
#define DNNL_RUNTIME_SEQ 1u
#define DNNL_RUNTIME_OMP 2u
#define DNNL_RUNTIME_TBB 4u
#define DNNL_RUNTIME_THREADPOOL 8u
#define DNNL_RUNTIME_OCL 256u
#define DNNL_RUNTIME_SYCL 512u
#define DNNL_RUNTIME_DPCPP DNNL_RUNTIME_SYCL
#define DNNL_RUNTIME_ZE 1024u

#define DNNL_VENDOR_NONE 0u
#define DNNL_VENDOR_INTEL 1u
#define DNNL_VENDOR_NVIDIA 2u
#define DNNL_VENDOR_AMD 4u
#define DNNL_VENDOR_GENERIC 8u

#define DNNL_CPU_THREADING_RUNTIME DNNL_RUNTIME_THREADPOOL
#define DNNL_CPU_RUNTIME DNNL_RUNTIME_THREADPOOL
#define DNNL_GPU_RUNTIME DNNL_RUNTIME_NONE
#define DNNL_GPU_VENDOR DNNL_VENDOR_NONE
#define DNNL_EXPERIMENTAL_GROUPED_MEMORY 0

#endif
